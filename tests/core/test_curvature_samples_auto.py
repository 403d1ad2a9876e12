"""``curvature_samples="auto"`` (the default): one sampled label per example under Adam and AdamW with
cross-entropy (BENCHMARKS.md "Curvature rows": no fidelity lost there, a third of the recording saved), every
class under SGD (sampling cost it 0.13-0.35 Spearman); an explicit value is kept under any optimizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb

CLASSES = 5


def _record(log_dir: Path, optimizer_class: Any, **options: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    rec = dvemb.Recorder(model, log_dir, proj_dim=None, **options)
    x, y = torch.randn(12, 6), torch.randint(0, CLASSES, (12,))
    for step in range(2):
        with rec.step(list(range(step * 6, step * 6 + 6)), optimizer):
            F.cross_entropy(model(x[step * 6 : step * 6 + 6]), y[step * 6 : step * 6 + 6]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    curvature: dict[str, Any] = json.loads((log_dir / "manifest.json").read_text())["curvature"]
    return curvature


@pytest.mark.parametrize(
    ("optimizer_class", "options", "samples", "rows"),
    [
        (torch.optim.Adam, {}, 1, 1),
        (torch.optim.AdamW, {}, 1, 1),
        (torch.optim.SGD, {}, None, CLASSES),
        (torch.optim.Adam, {"curvature_samples": None}, None, CLASSES),
        (torch.optim.SGD, {"curvature_samples": 2}, 2, 2),
    ],
)
def test_the_default_samples_follow_the_optimizer(
    tmp_path: Path, optimizer_class: Any, options: dict[str, Any], samples: int | None, rows: int
) -> None:
    curvature = _record(tmp_path / "log", optimizer_class, **options)
    assert (curvature["samples"], curvature["rows_per_example"]) == (samples, rows)


@pytest.mark.parametrize("bad", [0, -1, "all", 1.5, True])
def test_a_bad_value_is_refused_naming_the_choices(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(dvemb.ConfigError, match="curvature_samples must be 'auto', None or at least 1"):
        dvemb.Recorder(nn.Linear(3, 2), tmp_path / "log", curvature_samples=bad)
