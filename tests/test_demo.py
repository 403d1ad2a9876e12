"""`dvemb demo --quick --no-browser` end to end on the embedded server, checked for substance.

Measured (seed 0, quick): 63% of the 30 most harmful training examples (by total influence on the
clean test split) are the 30 flipped-label examples, against 5% by chance; we test a margin of 5x chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_quick_demo_finds_flipped_labels_and_phases(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    env["DVEMB_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvemb.cli",
            "demo",
            "--quick",
            "--no-browser",
            "--exit-when-done",
            "--port",
            str(free_port()),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out = done.stdout
    findings = json.loads(out[out.index("{") : out.rindex("}") + 1])
    digits = findings["digits"]
    assert digits["flipped"] == 30 and digits["train_size"] == 600
    assert digits["precision_at_k"] >= 5 * digits["chance"], digits
    assert digits["test_accuracy"] > 0.8
    lm = findings["charlm"]
    phases = lm["phases"]
    assert set(phases["ranges"]) == {"early", "basin", "late"}
    assert abs(sum(phases["share_abs_per_lr"].values()) - 1) < 1e-9
    assert abs(lm["first_tenth"] + lm["middle"] + lm["last_tenth"] - 1) < 1e-9
