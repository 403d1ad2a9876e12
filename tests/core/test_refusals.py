"""What the core refuses, in words (issue 21, partly held): negative ids and ids with bidirectional overrides at
record time; the command line on a log with a missing shard, a manifest nested thousands deep, and ``--out``
pointing at a file: one line and status 2, not a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb.cli import main
from dvemb.errors import ConfigError, LogFormatError
from dvemb.formats import check_ids, parse_shard_index, unsafe_character


def _record(directory: Path, steps: int = 4) -> Path:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(steps * 4, 6), torch.randint(0, 3, (steps * 4,))
    rec = dvemb.Recorder(model, directory, shard_steps=2)
    for step in range(steps):
        rows = slice(4 * step, 4 * step + 4)
        with rec.step(list(range(4 * step, 4 * step + 4)), optimizer):
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(torch.randn(3, 6), torch.randint(0, 3, (3,)))])
    rec.close()
    return directory


@pytest.mark.parametrize(("ids", "words"), [([0, -3, 2, 5], "example id 1 is -3"), (["a", "b\u202ec"], "control")])
def test_the_recorder_refuses_negative_and_spoofing_ids(log_dir: Path, ids: list[int | str], words: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir)
    with pytest.raises(ConfigError, match=words) as raised, rec.step(ids, optimizer):
        F.cross_entropy(model(torch.randn(len(ids), 6)), torch.zeros(len(ids), dtype=torch.long)).backward()
        optimizer.step()
    assert unsafe_character(str(raised.value)) is None  # an id is shown escaped, never as the override itself
    with pytest.raises(ValueError, match=r"\\u202e"):
        check_ids(["b\u202ec"])


def test_unsafe_characters_are_named() -> None:
    assert unsafe_character("plain text, tabs\tand\nnewlines, café 例") is None
    assert [unsafe_character(t) for t in ("a\x00", "\u202d", "x\u2069")] == ["U+0000", "U+202D", "U+2069"]


def test_compute_with_a_missing_shard_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _record(tmp_path / "log")
    (log / "shard-r0-000001.safetensors").unlink()
    assert main(["compute", str(log), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shard-r0-000001.safetensors: listed in the manifest but missing" in err, err


def test_out_pointing_at_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _record(tmp_path / "log", steps=2)
    afile = tmp_path / "results.json"
    afile.write_text("{}")
    for out in (afile, afile / "sub"):
        assert main(["compute", str(log), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err
            == f"dvemb: error: --out {out}: {afile} is a file; pass a directory for the results (created if missing)"
        )
    assert afile.read_text() == "{}"


def test_a_deeply_nested_manifest_or_index_is_a_format_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _record(tmp_path / "log", steps=2)
    deep = tmp_path / "deep"
    shutil.copytree(log, deep)
    manifest = json.loads((log / "manifest.json").read_text())
    text = json.dumps(manifest)[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (deep / "manifest.json").write_text(text)
    assert main(["inspect", str(deep)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "JSON nested too deeply" in err, err
    with pytest.raises(ValueError, match="line 1 is not a shard record"):
        parse_shard_index(("[" * 100_000 + "]" * 100_000 + "\n").encode(), 0, sealed=True)
    with pytest.raises(LogFormatError, match="nested too deeply"):
        dvemb.open_log(deep)
