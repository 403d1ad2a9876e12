"""Example ids are whatever the uploader wrote (issue 21, items 3 and 6): non-Latin letters, quotes, semicolons,
slashes, text a spreadsheet would run as a formula. Every route and download must take them as they are."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from urllib.parse import quote, unquote

from playwright.sync_api import Browser, expect
from service_harness import Api, record_log
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import sign_in

from dvemb.client import upload_log

# ids (printable: the recorder refuses control characters in ids) and labels (any text)
ODD = ("café-例#{i}", 'say "hi"; n={i}', "dir/{i}", "  =SUM({i})", " @cmd{i}", "   +{i}", " -{i}", "plain{i}")
LABELS = ("\n=1+{i}", "\r\n@x{i}", "\t-{i}", " \t +{i}", "=A{i}", "ok {i}", "  fine={i}", "-")


def odd_id(i: int) -> str:
    return ODD[i % len(ODD)].format(i=i)


def odd_label(i: int) -> str:
    return LABELS[i % len(LABELS)].format(i=i)


def analysed(api: Api, token: str, tmp_path: Path) -> int:
    log = record_log(tmp_path / "odd", steps=8, batch=8, shard_steps=4, id_of=odd_id, label_of=odd_label)
    result = upload_log(log, server=api.url, token=token, run_name="odd-ids", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(job["id"])


def filenames(disposition: str) -> tuple[str, str]:
    """The ASCII fallback ``filename="..."`` and the decoded ``filename*=UTF-8''...`` of a Content-Disposition."""
    plain = re.search(r'filename="([^"]*)"', disposition)
    extended = re.search(r"filename\*=UTF-8''([^;\s]*)", disposition)
    assert plain and extended, disposition
    return plain.group(1), unquote(extended.group(1), errors="strict")


def csv_rows(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode())))


def test_an_export_names_its_file_safely_for_any_id(api: Api, token: str, tmp_path: Path) -> None:
    job = analysed(api, token, tmp_path)
    for example in ("café-例#8", 'say "hi"; n=1'):
        # the path form (for ids without '/') and the query form
        for path, params in (
            (f"/jobs/{job}/export/example/{quote(example, safe='')}", {"query_set": "val"}),
            (f"/jobs/{job}/export/example", {"query_set": "val", "example_id": example}),
        ):
            got = api.get(path, params=params)
            assert got.status_code == 200, (example, got.text)
            ascii_name, name = filenames(got.headers["content-disposition"])
            assert name == f"job{job}-val-example-{example}.csv"
            assert ascii_name.isascii() and not set(ascii_name) & set('"\\;\r\n'), ascii_name
            assert ascii_name.endswith(".csv") and ascii_name.startswith(f"job{job}-val-example-")
            rows = csv_rows(got.content)
            history = api.get(f"/jobs/{job}/example", params={"query_set": "val", "example_id": example}).json()
            assert [int(r["step"]) for r in rows] == [h["step"] for h in history["history"]] != []
    parquet = api.get(f"/jobs/{job}/export/top", params={"query_set": "val", "format": "parquet"})
    assert filenames(parquet.headers["content-disposition"])[1] == f"job{job}-val-top-helpful.parquet"


def risky(text: str) -> bool:
    """Text a spreadsheet may run as a formula: a formula character after any leading whitespace."""
    return text.lstrip(" \t\r\n").startswith(("=", "+", "-", "@")) or text.startswith(("\t", "\r"))


def test_csv_cells_never_start_a_formula_even_after_whitespace(api: Api, token: str, tmp_path: Path) -> None:
    job = analysed(api, token, tmp_path)
    ranked = api.get(f"/jobs/{job}/examples", params={"query_set": "val", "limit": 1000}).json()["data"]
    rows = csv_rows(api.get(f"/jobs/{job}/export/examples", params={"query_set": "val"}).content)
    assert len(rows) == len(ranked) == 64
    defused = 0
    for shown, row in zip(ranked, rows, strict=True):
        for column in ("example_id", "label"):
            text, cell = str(shown[column]), row[column]
            if risky(text):
                defused += 1
                assert cell == "'" + text, (text, cell)  # the apostrophe comes first: nothing for a sheet to run
            else:
                assert cell == text
    assert defused == 32 + 48  # ids: "  =SUM", " @cmd", "   +", " -"; labels: all but "ok" and "  fine="


def test_ids_with_a_slash_have_their_page_and_export(api: Api, token: str, tmp_path: Path) -> None:
    job = analysed(api, token, tmp_path)
    ranked = api.get(f"/jobs/{job}/examples", params={"query_set": "val", "limit": 1000}).json()["data"]
    ids = [r["example_id"] for r in ranked]
    slashed = [e for e in ids if "/" in e]
    assert len(slashed) == 8
    for example in [*slashed[:2], "  =SUM(3)", " @cmd4", "café-例#8", 'say "hi"; n=1']:
        params = {"query_set": "val", "example_id": example}
        page = api.get(f"/jobs/{job}/example", params=params)
        assert page.status_code == 200, (example, page.text)
        assert page.json()["history"] and page.json()["example_id"] == example
        exported = api.get(f"/jobs/{job}/export/example", params=params)
        assert exported.status_code == 200 and len(csv_rows(exported.content)) == len(page.json()["history"])
    encoded = api.get(f"/jobs/{job}/examples/dir%2F2", params={"query_set": "val"})  # the old path form, %2F
    assert encoded.status_code == 200 and encoded.json()["example_id"] == "dir/2", encoded.text
    missing = api.get(f"/jobs/{job}/example", params={"query_set": "val", "example_id": "dir/nope"})
    assert missing.status_code == 404 and "dir/nope" in missing.json()["detail"]
    empty = api.get(f"/jobs/{job}/example", params={"query_set": "val", "example_id": ""})
    assert empty.status_code == 422 and "example_id" in empty.json()["detail"]
    # what the examples are: id= once per example takes ids with commas, slashes, quotes
    named = ["dir/2", 'say "hi"; n=1', "café-例#8"]
    meta = api.get(f"/jobs/{job}/metadata", params=[("id", e) for e in named])
    assert meta.status_code == 200 and set(meta.json()) == set(named), meta.text
    nothing = api.get(f"/jobs/{job}/metadata")
    assert nothing.status_code == 400 and "id=" in nothing.json()["detail"]


def test_the_dashboard_opens_and_exports_an_example_whose_id_has_a_slash(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    job = analysed(api, token, tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server_url + "/")
    sign_in(page, token)
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    for example in ("dir/2", "café-例#8"):
        history = api.get(f"/jobs/{job}/example", params={"query_set": "val", "example_id": example}).json()
        page.goto(f"{server_url}/#/jobs/{job}/examples/{quote(example, safe='')}?qs=val")
        expect(page.locator("h1")).to_have_text(f"Example {example}")  # this example's page, not the last one's
        expect(page.locator("#history tbody tr")).to_have_count(len(history["history"]))
        with page.expect_download() as info:
            page.locator("[data-export='history'] [data-format='csv']").click()
        rows = csv_rows(Path(info.value.path()).read_bytes())
        assert [int(r["step"]) for r in rows] == [h["step"] for h in history["history"]]
        if "/" not in example:  # the exact name (filename*), not the ASCII fallback
            assert info.value.suggested_filename == f"job{job}-val-example-{example}.csv"
    page.close()
