"""Curvature factors of the ggn mode reproduce the Gauss-Newton matrix built directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyLM, mlp
from reference import ce_mean_over_positions, layer_matrix, per_example_ggn, per_example_grads
from torch import nn

import dvemb
from dvemb.curvature import ESTIMATOR, cross_entropy_factor_rows


def _record_factors(
    model: nn.Module, log_dir: Path, x: torch.Tensor, y: torch.Tensor, **kwargs: object
) -> dvemb.ShardData:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0 keeps the model at the reference point
    rec = dvemb.Recorder(model, log_dir, curvature="ggn", dtype="float64", **kwargs)  # type: ignore[arg-type]
    with rec.step(list(range(len(x))), optimizer):
        logits = model(x)
        rec.curvature(logits)
        F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
        optimizer.step()
    rec.close()
    return next(dvemb.open_log(log_dir).iter_shards())


@pytest.mark.parametrize("proj_dim", [None, (2, 3)], ids=["whole", "projected"])
def test_all_class_factors_give_the_exact_ggn(log_dir: Path, proj_dim: object) -> None:
    model = mlp(classes=4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    shard = _record_factors(model, log_dir, x, y, proj_dim=proj_dim)
    reference = per_example_grads(model, ce_mean_over_positions, x, y)
    log = dvemb.open_log(log_dir)
    assert log.manifest["curvature"]["rows_per_example"] == 4  # all classes
    for layer in log.layers:
        factors = shard.curvature[layer.name]  # (N, C, d)
        from_factors = torch.einsum("ncd,nce->nde", factors, factors)  # per-example sum_c f f^T
        ggn = per_example_ggn(model, layer.name, x)  # (N, D, D)
        p_out = layer.projection.p_out(dtype=torch.float64, device=torch.device("cpu"))
        p_in = layer.projection.p_in(dtype=torch.float64, device=torch.device("cpu"))
        proj = torch.kron(p_out, p_in)  # (D, d): row-major flattening of P_out^T G P_in
        expected = proj.T @ ggn @ proj
        err = (from_factors - expected).abs().max() / expected.abs().max()
        assert err < 1e-10, f"{layer.name}: {err:.2e}"
        batch_err = (from_factors.sum(0) - expected.sum(0)).abs().max() / expected.sum(0).abs().max()
        assert batch_err < 1e-10
        # the curvature pass must leave the ordinary per-example gradients untouched
        grads = layer.projection.project_matrix(layer_matrix(model, layer.name, reference))
        assert (shard.grads[layer.name] - grads).abs().max() < 1e-10 * grads.abs().max()


def test_sampled_rows_through_the_recorder_are_unbiased_for_sequences(log_dir: Path) -> None:
    """One row per example (the default beyond 32 classes), recorded for many copies of two sequences: the mean of
    f f^T over the copies converges to (1/L) sum_t J_t^T H_t J_t (a wrong 1/sqrt(L) scale, or rows whose products
    between positions do not vanish, are off by far more)."""
    model = TinyLM(vocab=5, width=3, hidden=3)
    torch.manual_seed(0)
    tokens, targets = torch.randint(1, 5, (2, 3)), torch.randint(0, 5, (2, 3))
    copies = 3000
    shard = _record_factors(
        model,
        log_dir,
        tokens.repeat(copies, 1),
        targets.repeat(copies, 1),
        proj_dim=None,
        curvature_samples=1,
        layers=["head"],
    )
    factors = shard.curvature["head"]  # (2 * copies, 1, d)
    assert factors.shape[1] == 1
    assert dvemb.open_log(log_dir).manifest["curvature"]["estimator"] == ESTIMATOR
    products = torch.einsum("nsd,nse->nde", factors, factors).view(copies, 2, *factors.shape[2:], -1)
    estimate = products.mean(0)  # (2, d, d)
    exact = per_example_ggn(model, "head", tokens)
    rel = (estimate - exact).norm() / exact.norm()
    assert rel < 0.08, f"Monte Carlo estimate is off by {rel:.3f}"


@pytest.mark.parametrize("samples", [1, 2, 3, 5])
def test_fewer_rows_are_an_unbiased_estimate(samples: int) -> None:
    """The most probable classes and one label drawn from the others: the mean over draws of sum f f^T, f an
    example's rows over all its positions, converges to the block-diagonal c_t (diag p_t - p_t p_t^T) (Monte Carlo
    error about 1/sqrt(draws); dropping a class, the rest's row without its sqrt(m), or rows without signs of their
    own once classes are kept, whose products between positions stay, are off by more than 10%)."""
    torch.manual_seed(0)
    batch, positions, vocab = 3, 2, 5
    logits = torch.randn(batch, positions, vocab, dtype=torch.float64) * 2
    weights = torch.rand(batch, positions, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    blocks = weights[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])  # (B, L, V, V)
    exact = torch.zeros(batch, positions * vocab, positions * vocab, dtype=torch.float64)
    for t in range(positions):
        exact[:, t * vocab : (t + 1) * vocab, t * vocab : (t + 1) * vocab] = blocks[:, t]
    generator = torch.Generator().manual_seed(1)
    draws = 4000
    # Every position's draw is its own (labels and signs are drawn per position), so `draws` copies of the batch in
    # one call are `draws` independent draws of it: the same Monte Carlo average as a loop of calls, in one.
    rows = cross_entropy_factor_rows(
        logits.repeat(draws, 1, 1), weights.repeat(draws, 1), samples=samples, generator=generator
    )  # (R, draws * B, L, V)
    assert rows.shape[0] == min(samples, vocab)
    joint = rows.reshape(rows.shape[0], draws, batch, positions * vocab)  # an example's rows at all its positions
    total = torch.einsum("rdbi,rdbj->bij", joint, joint)
    error = ((total / draws - exact).norm() / exact.norm()).item()
    assert error < 0.05, f"{samples} rows: the estimate is off by {error:.3f}"


def test_curvature_after_a_plain_backward_says_how_to_fix_it(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, curvature="ggn")
    with pytest.raises(dvemb.RecorderError, match="before loss.backward"), rec.step([0, 1], optimizer):
        logits = model(torch.randn(2, 6))
        F.cross_entropy(logits, torch.tensor([0, 1])).backward()
        rec.curvature(logits)


def test_an_output_that_does_not_reach_the_loss_is_reported(log_dir: Path) -> None:
    """ggn finds its rows at the model's output: when the loss is computed from something else, say how to fix it."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, curvature="ggn")
    with pytest.raises(dvemb.RecorderError, match="rec.curvature"), rec.step([0, 1], optimizer):
        hidden = model[:2](torch.randn(2, 6))  # the loss is taken from a slice of the model, not model(x)
        F.cross_entropy(model[2](hidden), torch.tensor([0, 1])).backward()
        optimizer.step()
    assert dvemb.open_log(log_dir).num_steps == 0  # nothing half-recorded


def test_curvature_in_empirical_mode_is_refused(log_dir: Path) -> None:
    model = mlp()
    rec = dvemb.Recorder(model, log_dir, curvature="empirical")
    with pytest.raises(dvemb.RecorderError, match="ggn"), rec.step([0], torch.optim.SGD(model.parameters(), lr=0.1)):
        rec.curvature(model(torch.randn(1, 6)))
