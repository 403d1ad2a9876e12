"""Recorded per-example gradients equal projected reference gradients (torch.func), in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyCNN, TinyLM, mlp
from reference import ce_mean_over_positions, layer_matrix, per_example_grads
from torch import nn

import dvemb

TOL = 1e-10


def _record_one_step(
    model: nn.Module,
    log_dir: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    micro_batches: list[slice],
    reduction: str,
    proj_dim: object,
    layers: object = None,
) -> dvemb.ShardData:
    """One optimizer step, possibly over several micro-batches, with the loss scaled as users do."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = dvemb.Recorder(
        model, log_dir, proj_dim=proj_dim, layers=layers, loss_reduction=reduction, dtype="float64", projection="random"
    )  # the seeded projection: these tests rebuild it from the manifest
    with rec.step(list(range(100, 100 + len(x))), optimizer):
        for part in micro_batches:
            logits = model(x[part])
            loss = F.cross_entropy(logits.flatten(0, -2), y[part].flatten(), reduction=reduction)
            if reduction == "mean":
                loss = loss * (len(x[part]) / len(x))  # accumulate to the mean over the whole step
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    rec.close()
    return next(dvemb.open_log(log_dir).iter_shards())


def _assert_matches_reference(
    model: nn.Module,
    params_before: dict[str, torch.Tensor],
    log_dir: Path,
    shard: dvemb.ShardData,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params_before[name])  # the reference is taken at the parameters the step saw
    reference = per_example_grads(model, ce_mean_over_positions, x, y)
    log = dvemb.open_log(log_dir)
    assert log.layers, "no layer recorded"
    for layer in log.layers:
        expected = layer.projection.project_matrix(layer_matrix(model, layer.name, reference))  # (N, d)
        got = shard.grads[layer.name]
        assert got.shape == expected.shape
        err = (got - expected).abs().max() / expected.abs().max()
        assert err < TOL, f"{layer.name}: relative error {err:.2e}"


CASES = {
    "mlp": (lambda: mlp(), lambda: (torch.randn(6, 6), torch.randint(0, 3, (6,))), None),
    "lm": (lambda: TinyLM(), lambda: (torch.randint(0, 7, (6, 4)), torch.randint(0, 7, (6, 4))), "all"),
    "cnn-zeros": (lambda: TinyCNN("zeros"), lambda: (torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))), "all"),
    "cnn-reflect": (lambda: TinyCNN("reflect"), lambda: (torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))), "all"),
    "cnn-circular": (lambda: TinyCNN("circular"), lambda: (torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))), "all"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("proj_dim", [None, (3, 4)], ids=["whole", "projected"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["one-batch", "accumulated"])
def test_recorded_gradients_equal_reference(
    case: str, reduction: str, proj_dim: object, accumulate: bool, log_dir: Path
) -> None:
    make_model, make_data, layers = CASES[case]
    model = make_model()
    x, y = make_data()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    parts = [slice(0, 4), slice(4, 6)] if accumulate else [slice(0, 6)]
    shard = _record_one_step(
        model, log_dir, x, y, micro_batches=parts, reduction=reduction, proj_dim=proj_dim, layers=layers
    )
    if reduction == "sum":
        # the per-example loss of a sequence under a summed loss is the sum over its positions
        positions = y[0].numel()
        shard.grads = {k: v / positions for k, v in shard.grads.items()}
    _assert_matches_reference(model, before, log_dir, shard, x, y)


def test_embedding_padding_rows_get_no_gradient(log_dir: Path) -> None:
    model = TinyLM()
    tokens = torch.zeros(3, 4, dtype=torch.long)  # every token is the padding index
    shard = _record_one_step(
        model,
        log_dir,
        tokens,
        torch.randint(0, 7, (3, 4)),
        micro_batches=[slice(0, 3)],
        reduction="mean",
        proj_dim=None,
        layers=["embed"],
    )
    assert shard.grads["embed"].abs().max() == 0


def test_projection_is_reproducible_from_the_manifest(log_dir: Path) -> None:
    model = mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    shard = _record_one_step(model, log_dir, x, y, micro_batches=[slice(0, 5)], reduction="mean", proj_dim=9)
    layer = dvemb.open_log(log_dir).layers[0]
    rebuilt = dvemb.LayerProjection(
        **{f: getattr(layer.projection, f) for f in ("out_dim", "in_dim", "k_out", "k_in", "seed_out", "seed_in")}
    )
    p = rebuilt.p_out(dtype=torch.float64, device=torch.device("cpu"))
    assert p.shape == (5, 3)
    assert torch.equal(p, layer.projection.p_out(dtype=torch.float64, device=torch.device("cpu")))
    assert shard.grads[layer.name].shape == (5, 9)
    assert not layer.projection.is_identity


def test_projection_preserves_inner_products_on_average() -> None:
    """A Gaussian Kronecker projection is unbiased: E[<Pa, Pb>] = <a, b>."""
    a, b = torch.randn(20, 30), torch.randn(20, 30)
    estimates = []
    for seed in range(300):
        proj = dvemb.LayerProjection(20, 30, 8, 8, seed_out=2 * seed, seed_in=2 * seed + 1)
        estimates.append(float(proj.project_matrix(a) @ proj.project_matrix(b)))
    exact = float((a * b).sum())
    spread = torch.tensor(estimates).std().item() / 300**0.5
    assert abs(sum(estimates) / len(estimates) - exact) < 4 * spread
