"""Figures of the full `dvemb demo` for BENCHMARKS.md and the README's screenshots.

Run:  .venv/bin/python -m bench.demo_figures      (about 5 minutes on 2 cores)

Runs the full demo on a fresh embedded data directory, reads its findings (flipped-label precision at
the size of the flipped set; the share of |influence / lr| in the first and last tenth of the language
model's training against the middle), screenshots the dashboard with Debian's headless Chromium into
docs/images/, and writes the "## Demo" section of BENCHMARKS.md.
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

from playwright.sync_api import sync_playwright

from bench.markdown import replace_section

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo() -> tuple[dict[str, Any], subprocess.Popen[str], str]:
    data = tempfile.mkdtemp(prefix="dvemb-demo-data-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")} | {"DVEMB_DATA_DIR": data}
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvemb.cli", "demo", "--no-browser", "--port", str(port)],
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
        if line.startswith("serving the dashboard"):
            break
    findings = json.loads(text[text.index("{") : text.rindex("}") + 1])
    return findings, proc, f"http://127.0.0.1:{port}"


def screenshots(url: str, findings: dict[str, Any]) -> None:
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


def write_section(findings: dict[str, Any]) -> None:
    d, lm = findings["digits"], findings["charlm"]
    section = "\n".join(
        [
            "## Demo",
            "",
            f"Command: `.venv/bin/python -m bench.demo_figures` ({time.strftime('%Y-%m-%d')}, 2 CPU cores), which runs the full "
            f"`dvemb demo` (both trainings, uploads, worker analyses) in {findings['seconds']:.0f} s.",
            "",
            "| finding | value |",
            "|---|---|",
            f"| digits MLP: flipped labels among the {d['flipped']} most harmful examples (total influence on the clean test split) | "
            f"{d['precision_at_k']:.0%} (chance {d['chance']:.0%}, {d['lift_over_chance']:.1f}x) |",
            f"| digits MLP: test accuracy despite the flipped labels | {d['test_accuracy']:.1%} |",
            f"| char LM: share of total \\|influence / lr\\| in the first tenth of training | {lm['first_tenth']:.1%} |",
            f"| char LM: share in the last tenth | {lm['last_tenth']:.1%} |",
            f"| char LM: share in the middle eight tenths | {lm['middle']:.1%} |",
            f"| char LM: phases found (steps) | early {lm['phases']['ranges']['early']}, basin {lm['phases']['ranges']['basin']}, "
            f"late {lm['phases']['ranges']['late']} |",
            "",
            "Uniform influence would put 10% in each tenth. Screenshots: docs/images/demo-*.png.",
            "",
        ]
    )
    replace_section("Demo", section)


def main() -> None:
    findings, proc, url = run_demo()
    try:
        screenshots(url, findings)
        write_section(findings)
        print(json.dumps({k: v for k, v in findings.items() if k != "token"}, indent=2))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
