"""``dvemb top RESULTS`` (issue 24): the top helpful and harmful examples of a results directory, offline, as the
results files hold them (occurrences) and as a naive ranking of the per-example totals gives them (``--totals``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb.cli import main
from dvemb.engine import compute
from dvemb.engine.results import load_results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("top")
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, work / "log", proj_dim=None)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    for step in range(6):
        ids = [f"ex-{i}" for i in range(4 * step, 4 * step + 4)]
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x[4 * step : 4 * step + 4]), y[4 * step : 4 * step + 4]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(x[:5], y[:5])])
    rec.close()
    compute(work / "log", work / "out")
    return work / "out"


def test_top_occurrences_as_json_are_the_results_files(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", str(results), "--json", "-k", "3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    loaded = load_results(results)
    assert shown["query_set"] == "val"
    for kind in ("helpful", "harmful"):
        assert shown[kind] == loaded.top("val", kind=kind, k=3)
        assert all((r["score"] > 0) == (kind == "helpful") for r in shown[kind])


def test_top_totals_are_a_naive_ranking_of_the_totals(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", str(results), "--totals", "--json", "--query", "2", "-k", "4"]) == 0
    shown = json.loads(capsys.readouterr().out)
    loaded = load_results(results)
    column = np.asarray(loaded.totals("val"))[:, 2]
    pairs = sorted(zip(column.tolist(), loaded.example_ids, strict=True), key=lambda p: -p[0])
    expected = [{"rank": i, "total": t, "example_id": e} for i, (t, e) in enumerate(p for p in pairs if p[0] > 0)][:4]
    assert shown["helpful"] == expected
    assert main(["top", str(results), "--totals"]) == 0  # the tables
    printed = capsys.readouterr().out
    assert "top examples by total influence" in printed and "harmful:" in printed


def test_top_errors_are_one_line(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", str(results), "--query-set", "nope"]) == 2
    assert "no results for query set 'nope'" in capsys.readouterr().err
    assert main(["top", str(results.parent / "missing")]) == 2
    assert "no finished results" in capsys.readouterr().err
