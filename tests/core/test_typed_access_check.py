"""scripts/check_typed_access.py (issue 26): the tree passes it, and a planted string-key read of a manifest or a
summary outside the formats fails it, naming the line; the exemptions it documents hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_typed_access.py"


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, check=False)


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


def test_the_project_reads_manifests_and_summaries_typed() -> None:
    done = _run(ROOT)
    assert done.returncode == 0, done.stderr


def test_a_planted_string_key_read_fails_the_check(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "dvemb/engine/planted.py": 'def f(log):\n    return log.manifest["dtype"]\n',
            "server/services/planted.py": 'def g(job):\n    return (job.summary or {}).get("steps")\n',
            "worker/planted.py": "def h(summary):\n    return summary.get('removal', 'weight')\n",
        },
    )
    done = _run(root)
    assert done.returncode == 1
    for where in ("dvemb/engine/planted.py:2", "server/services/planted.py:2", "worker/planted.py:2"):
        assert where in done.stderr, done.stderr
    assert "3 string-key read(s)" in done.stderr


def test_the_exemptions_hold(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "dvemb/formats/manifest.py": 'def f(manifest):\n    return manifest["dtype"]\n',
            "dvemb/reader.py": 'def f(manifest):\n    return manifest.get("model")\n',
            "server/services/reads.py": 'steps = Job.summary["steps"].as_integer()  # SQL\n',
            "worker/ok.py": "def h(log):\n    return log.info.dtype  # manifest['dtype'] in a comment\n",
        },
    )
    done = _run(root)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(root / "dvemb")
