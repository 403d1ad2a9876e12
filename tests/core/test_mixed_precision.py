"""Mixed precision: bf16 autocast scores agree with float32, and a GradScaler's skipped step is no update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb.engine import ComputeArguments, compute


@pytest.fixture(autouse=True)
def _float32() -> None:
    """Autocast casts float32: these tests run in the default dtype, not the core tests' float64."""
    torch.set_default_dtype(torch.float32)


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 12, generator=generator)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _train_and_score(log: Path, out: Path, autocast: torch.dtype | None) -> np.ndarray:
    torch.manual_seed(0)
    model = mlp(inputs=12, hidden=16, classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    rec = dvemb.Recorder(model, log, proj_dim=(4, 8), projection="random")
    for step in range(12):
        ids = list(range((step % 6) * 16, (step % 6) * 16 + 16))
        with (
            rec.step(ids, optimizer),
            torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None),
        ):
            F.cross_entropy(model(x[ids]).float(), y[ids]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(x[:24], y[:24])])
    rec.close()
    compute(log, out, ComputeArguments(accumulate_dtype="float64"))
    return np.load(out / "scores-val.npy")


def test_bf16_autocast_scores_agree_with_float32(tmp_path: Path) -> None:
    """The hooks see bfloat16 activations and output gradients; they are projected in float32. The two
    trainings differ by bf16 rounding only: every occurrence's mean score ranks alike (Spearman > 0.99)."""
    full = _train_and_score(tmp_path / "f32", tmp_path / "o32", None)
    half = _train_and_score(tmp_path / "bf16", tmp_path / "obf16", torch.bfloat16)
    assert dvemb.open_log(tmp_path / "bf16").load_query_set("val").grads["0"].dtype == torch.float32
    a, b = full.mean(1), half.mean(1)
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    spearman = np.corrcoef(rank(a), rank(b))[0, 1]
    assert spearman > 0.99, spearman
    assert not np.allclose(a, b, rtol=1e-6, atol=0)  # the bf16 run really differed


def test_grad_scaler_skipped_step_is_not_an_update(tmp_path: Path) -> None:
    """fp16 autocast with a GradScaler whose first scale overflows: the scaler skips that update, the log
    leaves it out (its index in skipped_steps), and later rows are unscaled: their mean is the step's
    unscaled gradient."""
    torch.manual_seed(0)
    model = mlp(inputs=12, hidden=16, classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-50, growth_interval=1000)
    x, y = _data()
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None, projection="random")
    batch_grads = []
    for step in range(4):
        ids = list(range(step * 16, step * 16 + 16))
        with rec.step(ids, optimizer, scaler=scaler):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[ids]).float(), y[ids])
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # unscales .grad in place, or skips on inf
            batch_grads.append(torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1).clone())
            scaler.update()
            optimizer.zero_grad()
    rec.close()
    log = dvemb.open_log(tmp_path / "log")
    assert log.manifest["skipped_steps"] == [0] and log.num_steps == 3
    shard = next(log.iter_shards())
    assert shard.example_ids[:16] == list(range(16, 32))  # the first recorded update is the second step
    for position, expected in enumerate(batch_grads[1:]):
        rows = shard.grads["2"][shard.row_step == position]  # (16, 3 * 17): each example's own gradient
        assert torch.allclose(rows.mean(0), expected.flatten(), rtol=2e-2, atol=1e-4)


def test_scaler_needs_the_optimizer(tmp_path: Path) -> None:
    rec = dvemb.Recorder(mlp(), tmp_path / "log", proj_dim=None)
    with pytest.raises(dvemb.ConfigError, match="scaler"), rec.step([0], lr=0.1, scaler=torch.amp.GradScaler("cpu")):
        pass


class _Bf16Inside(torch.nn.Module):
    """A model that runs in bfloat16 inside its forward and returns a float32 copy of its logits, as accelerate's
    mixed-precision wrapper does; the loss below is computed from that copy's source by the model's own caller."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(inputs=12, hidden=16, classes=10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.net(x)  # bfloat16
        return logits.float(), logits


@pytest.mark.parametrize("seed", range(6))
def test_rows_start_at_the_bfloat16_source_of_a_float32_copy(tmp_path: Path, seed: int) -> None:
    """The loss is taken on the model's bfloat16 logits, the model returns their float32 copy: the default recorder
    finds its rows at the copy's source, whose gradient is bfloat16 (its rounding alone misfits cross-entropy by
    about 1e-3, which the float32 tolerance refused on most seeds)."""
    torch.manual_seed(seed)
    model = _Bf16Inside()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 12), torch.randint(0, 10, (16,))
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=(4, 4), projection="random")
    for step in range(2):
        with rec.step(list(range(16 * step, 16 * step + 16)), optimizer):
            _, raw = model(x)
            F.cross_entropy(raw.float(), y).backward()  # the loss never sees the returned copy
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    shard = next(dvemb.open_log(tmp_path / "log").iter_shards())
    for name, rows in shard.curvature.items():
        assert torch.isfinite(rows).all() and rows.abs().max() > 0, name
