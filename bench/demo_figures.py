"""Every figure the README and BENCHMARKS.md give about `dvemb demo`, from demo runs (issue 24: hand-written
figures drifted from what the demo shows).

Run:  .venv/bin/python -m bench.demo_figures      (the full demo and the quick one: about 10 minutes on 2 cores)

Runs the full demo on a fresh embedded data directory, reads its findings (flipped-label precision at
the size of the flipped set; the share of |influence / lr| in the first and last tenth of the language
model's training against the middle; the phases found), screenshots the dashboard with Debian's headless
Chromium into docs/images/, then runs `dvemb demo --quick` (what the test suite runs). Writes:

- docs/demo-findings.json: both runs' findings (tests/test_demo.py checks a quick run against them);
- the README's demo paragraph, between ``<!-- demo-findings -->`` markers (:func:`readme_block`; a test checks
  that the README holds exactly what the JSON renders to);
- the "## Demo" section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.markdown import replace_section

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
FINDINGS = ROOT / "docs" / "demo-findings.json"
README = ROOT / "README.md"
START, END = "<!-- demo-findings: written by bench/demo_figures.py -->", "<!-- /demo-findings -->"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(*, quick: bool = False) -> tuple[dict[str, Any], subprocess.Popen[str], str]:
    data = tempfile.mkdtemp(prefix="dvemb-demo-data-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")} | {"DVEMB_DATA_DIR": data}
    port = _port()
    flags = ["--quick", "--exit-when-done"] if quick else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvemb.cli", "demo", "--no-browser", "--port", str(port), *flags],
        env=env,
        cwd=data,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    text = ""
    for line in proc.stdout:
        text += line
        if line.startswith("serving the dashboard") or (quick and line.startswith("flipped labels among")):
            break
    findings = json.loads(text[text.index("{") : text.rindex("}") + 1])
    return findings, proc, f"http://127.0.0.1:{port}"


def screenshots(url: str, findings: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    IMAGES.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_label("API token").fill(findings["token"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector("#runs")
        for name in ("charlm", "digits"):  # the README shows the LM phase plot and the digits tables
            page.locator("#runs a", has_text=name).first.click()
            page.wait_for_selector("#results[data-ready=true]", timeout=60_000)
            page.locator("#phase-plot").screenshot(path=str(IMAGES / f"demo-{name}-phase-plot.png"))
            page.locator("#top-harmful").screenshot(path=str(IMAGES / f"demo-{name}-top-harmful.png"))
            page.locator("#examples-harmful").screenshot(path=str(IMAGES / f"demo-{name}-harmful-examples.png"))
            page.goto(url + "/#/runs")
            page.wait_for_selector("#runs")
        browser.close()


def _public(findings: dict[str, Any]) -> dict[str, Any]:
    """What a run found, without what is only of that run (its token, URL, job ids)."""
    keep = {k: v for k, v in findings.items() if k not in ("token", "dashboard")}
    return keep | {name: {k: v for k, v in keep[name].items() if k != "job"} for name in ("digits", "charlm")}


def readme_block(record: dict[str, Any]) -> str:
    """The README's paragraph about the demo, from docs/demo-findings.json (markers included)."""
    d, lm, quick = record["full"]["digits"], record["full"]["charlm"], record["quick"]["digits"]
    ranges = lm["phases"]["ranges"]
    minutes = record["full"]["seconds"] / 60
    return "\n".join(
        [
            START,
            f"**What the demo shows** (it took {minutes:.0f} minutes on two CPU cores when its figures were last "
            "measured; everything through the real path: recorder, upload, worker, database, dashboard at "
            "http://127.0.0.1:8000, sign in with the printed token):",
            "",
            f"- an MLP on scikit-learn's digits with 5% of its training labels flipped on purpose: ranked by their "
            f"total influence on the clean test split, {d['precision_at_k']:.0%} of the {d['flipped']} most harmful "
            f"training examples are flipped ones (chance: {d['chance']:.0%}); test accuracy {d['test_accuracy']:.1%};",
            f"- a small character-level transformer trained with warmup and cosine decay on Python's own standard "
            f"library source: the phase plot of its per-learning-rate influence on held-out text, with "
            f"{lm['first_tenth']:.0%} of it in the first tenth of training, {lm['last_tenth']:.0%} in the last tenth "
            f"and {lm['middle']:.0%} in the eight tenths between (uniform: 10%, 10%, 80%); phases found: early steps "
            f"{ranges['early'][0]}-{ranges['early'][1]}, basin {ranges['basin'][0]}-{ranges['basin'][1]}, late "
            f"{ranges['late'][0]}-{ranges['late'][1]}.",
            "",
            f"`dvemb demo --quick` (what the test suite runs) finds {quick['precision_at_k']:.0%} of its "
            f"{quick['flipped']} most harmful examples flipped (chance {quick['chance']:.0%}). These figures and the "
            f"images below are written by `.venv/bin/python -m bench.demo_figures` ({record['date']}), never by hand "
            '(BENCHMARKS.md, "Demo").',
            END,
        ]
    )


def write_readme(record: dict[str, Any], path: Path = README) -> None:
    text = path.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    path.write_text(text[:start] + readme_block(record) + text[end:])


def write_section(record: dict[str, Any]) -> None:
    findings, quick = record["full"], record["quick"]
    d, lm = findings["digits"], findings["charlm"]
    qd, qlm = quick["digits"], quick["charlm"]
    section = "\n".join(
        [
            "## Demo",
            "",
            f"Command: `.venv/bin/python -m bench.demo_figures` ({record['date']}, 2 CPU cores), which runs the full "
            f"`dvemb demo` (both trainings, uploads, worker analyses) in {findings['seconds']:.0f} s and "
            f"`dvemb demo --quick` in {quick['seconds']:.0f} s; the README's demo paragraph and docs/demo-findings.json "
            "are written by the same run.",
            "",
            "| finding | full demo | quick demo |",
            "|---|---|---|",
            f"| digits MLP: flipped labels among the k most harmful examples, k = the flipped set (total influence on "
            f"the clean test split) | {d['precision_at_k']:.0%} of {d['flipped']} (chance {d['chance']:.0%}, "
            f"{d['lift_over_chance']:.1f}x) | {qd['precision_at_k']:.0%} of {qd['flipped']} (chance {qd['chance']:.0%}, "
            f"{qd['lift_over_chance']:.1f}x) |",
            f"| digits MLP: test accuracy despite the flipped labels | {d['test_accuracy']:.1%} | "
            f"{qd['test_accuracy']:.1%} |",
            f"| char LM: share of total \\|influence / lr\\| in the first tenth of training | {lm['first_tenth']:.1%} | "
            f"{qlm['first_tenth']:.1%} |",
            f"| char LM: share in the last tenth | {lm['last_tenth']:.1%} | {qlm['last_tenth']:.1%} |",
            f"| char LM: share in the middle eight tenths | {lm['middle']:.1%} | {qlm['middle']:.1%} |",
            f"| char LM: phases found (steps) | early {lm['phases']['ranges']['early']}, basin "
            f"{lm['phases']['ranges']['basin']}, late {lm['phases']['ranges']['late']} | early "
            f"{qlm['phases']['ranges']['early']}, basin {qlm['phases']['ranges']['basin']}, late "
            f"{qlm['phases']['ranges']['late']} |",
            "",
            "Uniform influence would put 10% in each tenth. Screenshots (full demo): docs/images/demo-*.png.",
            "",
        ]
    )
    replace_section("Demo", section)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    findings, proc, url = run_demo()
    try:
        screenshots(url, findings)
    finally:
        stop(proc)
    quick, proc, _ = run_demo(quick=True)
    stop(proc)
    record = {"date": time.strftime("%Y-%m-%d"), "full": _public(findings), "quick": _public(quick)}
    FINDINGS.write_text(json.dumps(record, indent=1) + "\n")
    write_readme(record)
    write_section(record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
