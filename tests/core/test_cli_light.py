"""The core installs and starts alone: `dvemb --help` loads neither torch nor the server, and with the
server's and client's packages missing `dvemb compute` still works while `dvemb upload` names the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb

# Make the extras' packages unimportable, as after `pip install dvemb` without extras.
_BLOCK = textwrap.dedent(
    """
    import sys
    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"httpx", "tusclient", "fastapi", "sqlalchemy", "celery", "uvicorn", "transformers"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Missing())
    from dvemb.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_help_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys; from dvemb.cli import build_parser; build_parser(); "
        "heavy = {'torch', 'server.main', 'server.settings', 'fastapi', 'httpx', 'sqlalchemy', 'demo.run'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_compute_and_inspect_run_without_the_extras(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for step in range(2):
        ids = list(range(4 * step, 4 * step + 4))
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(x[:2], y[:2])])
    rec.close()

    def dvemb_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _BLOCK, *args], capture_output=True, text=True, timeout=120)

    inspected = dvemb_cli("inspect", str(tmp_path / "log"), "--verify")
    assert inspected.returncode == 0, inspected.stderr
    computed = dvemb_cli("compute", str(tmp_path / "log"), "--out", str(tmp_path / "out"), "--quiet")
    assert computed.returncode == 0, computed.stderr
    assert (tmp_path / "out" / "summary.json").exists()
    upload = dvemb_cli("upload", str(tmp_path / "log"), "--server", "http://127.0.0.1:9", "--token", "t")
    assert upload.returncode == 2 and "pip install 'dvemb[client]'" in upload.stderr, upload.stderr
