"""Example ids are whatever the uploader wrote (issue 21, items 3 and 6): non-Latin letters, quotes, semicolons,
slashes, text a spreadsheet would run as a formula. Every route and download must take them as they are."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from urllib.parse import quote, unquote

from service_harness import Api, record_log

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
        for path, params in ((f"/jobs/{job}/export/example/{quote(example, safe='')}", {"query_set": "val"}),):
            got = api.get(path, params=params)
            assert got.status_code == 200, (example, got.text)
            ascii_name, name = filenames(got.headers["content-disposition"])
            assert name == f"job{job}-val-example-{example}.csv"
            assert ascii_name.isascii() and not set(ascii_name) & set('"\\;\r\n'), ascii_name
            assert ascii_name.endswith(".csv") and ascii_name.startswith(f"job{job}-val-example-")
            rows = csv_rows(got.content)
            history = api.get(f"/jobs/{job}/examples/{quote(example, safe='')}", params={"query_set": "val"}).json()
            assert [int(r["step"]) for r in rows] == [h["step"] for h in history["history"]] != []
    parquet = api.get(f"/jobs/{job}/export/top", params={"query_set": "val", "format": "parquet"})
    assert filenames(parquet.headers["content-disposition"])[1] == f"job{job}-val-top-helpful.parquet"
