"""frontend/js/statuses.js is written from dvemb/formats/statuses.py (issue 26): it is up to date, it names every
status of every enum, and the check fails on a stale copy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dvemb.formats import statuses

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "write_statuses_js.py"
TARGET = ROOT / "frontend" / "js" / "statuses.js"


def test_the_dashboards_statuses_are_the_servers() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    text = TARGET.read_text()
    for enum in (statuses.RunStatus, statuses.FileStatus, statuses.JobStatus, statuses.ReplayStatus):
        block = re.search(rf"export const {enum.__name__} = Object.freeze\(\{{(.*?)\}}\);", text, re.S)
        assert block is not None, enum.__name__
        assert dict(re.findall(r'(\w+): "([^"]+)"', block.group(1))) == {m.name: m.value for m in enum}


def test_a_stale_copy_fails_the_check(tmp_path: Path) -> None:
    stale = tmp_path / "repo"
    (stale / "scripts").mkdir(parents=True)
    (stale / "frontend" / "js").mkdir(parents=True)
    (stale / "scripts" / "write_statuses_js.py").write_text(SCRIPT.read_text())
    (stale / "dvemb").symlink_to(ROOT / "dvemb")
    (stale / "frontend" / "js" / "statuses.js").write_text(TARGET.read_text().replace('"succeeded"', '"done"'))
    done = subprocess.run(
        [sys.executable, str(stale / "scripts" / "write_statuses_js.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "frontend/js/statuses.js is out of date" in done.stdout
