"""examples/replay_trust.py runs as written, and its entry point drives ``dvemb replay`` to the same agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.bare_env import bare_env

ROOT = Path(__file__).resolve().parent.parent


def test_replay_example_and_its_entry_point(tmp_path: Path) -> None:
    env = bare_env(f"{ROOT}{os.pathsep}{ROOT / 'examples'}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "replay_trust.py")],
        cwd=tmp_path,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
        env=env,
    )
    assert "fast scores vs exact replay: Spearman" in done.stdout
    results = tmp_path / "runs" / "replay-results"
    first = json.loads((results / "trust-validation.json").read_text())
    scores = np.load(results / "replay-validation.npy")
    command = [sys.executable, "-m", "dvemb.cli", "replay", "runs/replay", "--entry", "replay_trust:replay_spec"]
    command += ["--out", "runs/replay-results", "--query-set", "validation", "--probe", "4"]
    done = subprocess.run(command, cwd=tmp_path, check=True, timeout=300, capture_output=True, text=True, env=env)
    report = json.loads(done.stdout)
    assert report["trust"]["all"] == first["all"]  # the same replay through the entry point
    np.testing.assert_array_equal(np.load(results / "replay-validation.npy"), scores)
