"""The examples run as written (the ad-hoc query example is exercised by tests/service/test_round_trip.py's API)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dvemb
from tests.bare_env import bare_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("script", "log"), [("plain_loop.py", "runs/plain"), ("lm_accumulation.py", "runs/lm")])
def test_example_records_a_valid_log(tmp_path: Path, script: str, log: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        check=True,
        timeout=300,
        capture_output=True,
        env=bare_env(str(ROOT)),
    )
    recorded = dvemb.open_log(tmp_path / log)
    recorded.validate()
    assert recorded.complete
    assert recorded.num_steps > 0
