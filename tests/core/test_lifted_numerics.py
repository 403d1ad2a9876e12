"""The lifted second moment at the engine's defaults (float32 accumulation, the automatic choice) on logs where
Adam's ``v_hat`` spans many orders of magnitude: inputs of which only a few features are ever non-zero (their
coordinates never see a gradient), large inputs with a summed loss, and layers whose shapes are each other's
transpose. Float32 agrees with float64, nothing crashes (issue 20; a review found 1e31 embeddings and a Cholesky
failure here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.engine import ComputeArguments, compute


def _record(
    log_dir: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-2, **options: object
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rec = dvemb.Recorder(model, log_dir, projection="random", **options)  # type: ignore[arg-type]
    reduction = str(options.get("loss_reduction", "mean"))
    for step in range(6):
        rows = slice(step * 8, step * 8 + 8)
        with rec.step(list(range(rows.start, rows.stop)), optimizer):
            F.cross_entropy(model(x[rows]), y[rows], reduction=reduction).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("test", [(x[:6], y[:6])])
    rec.close()


def _embeddings(log_dir: Path, out: Path, **options: object) -> np.ndarray:
    compute(log_dir, out, ComputeArguments(**options))  # type: ignore[arg-type]
    embeddings: np.ndarray = np.load(out / "embeddings.npy").astype(np.float64)
    return embeddings


@pytest.mark.parametrize(
    ("scale", "reduction", "lr"),
    [(1.0, "mean", 1e-3), (30.0, "sum", 1e-2)],  # float32 gave 1e16 where 2e-3 was right; Cholesky failed
)
def test_float32_follows_float64_where_few_coordinates_see_a_gradient(
    tmp_path: Path, scale: float, reduction: str, lr: float
) -> None:
    torch.manual_seed(0)
    x = torch.zeros(48, 32)
    x[:, :4] = torch.randn(48, 4) * scale  # 4 of 32 input features are ever non-zero
    y = torch.randint(0, 5, (48,))
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))
    _record(tmp_path / "log", model, x, y, lr, proj_dim=(8, 12), loss_reduction=reduction)
    wide = _embeddings(tmp_path / "log", tmp_path / "f64", accumulate_dtype="float64")
    narrow = _embeddings(tmp_path / "log", tmp_path / "f32")
    summary = dvemb.engine.load_results(tmp_path / "f32").summary
    assert "second-moment-dropped" not in [a["kind"] for a in summary["approximations"]]  # carried by default
    assert np.isfinite(narrow).all()
    np.testing.assert_allclose(narrow, wide, rtol=0, atol=1e-3 * np.abs(wide).max())


def test_layers_whose_shapes_are_transposes_are_not_stacked_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(48, 24), torch.randint(0, 24, (48,))
    model = nn.Sequential(nn.Linear(24, 48, bias=False), nn.Tanh(), nn.Linear(48, 24, bias=False))
    _record(tmp_path / "log", model, x, y, proj_dim=(8, 8), loss_reduction="sum")
    both = _embeddings(tmp_path / "log", tmp_path / "out", blocks="layer")
    assert np.isfinite(both).all() and np.abs(both).max() > 0
