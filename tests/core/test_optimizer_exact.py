"""Optimizer-exact propagation (momentum, Nesterov, Adam, AdamW) against the naive forward reference
of tests/core/optimizer_reference.py, what the recorder stores, and the fallbacks to the SGD proxy."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp
from optimizer_reference import removal_effects

import dvemb
from dvemb import logformat as fmt
from dvemb.engine import ComputeArguments, compute
from dvemb.engine.optimizer_maps import kronecker_preconditioner

OPTIMIZERS: dict[str, Callable[[object], torch.optim.Optimizer]] = {
    "momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),  # type: ignore[arg-type]
    "momentum-dampening-wd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, dampening=0.3, weight_decay=0.05),  # type: ignore[arg-type]
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),  # type: ignore[arg-type]
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01),  # type: ignore[arg-type]
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.1),  # type: ignore[arg-type]
}


def _record(
    log_dir: Path,
    make_optimizer: Callable[[object], torch.optim.Optimizer],
    *,
    curvature: str = "ggn",
    reduction: str = "mean",
    proj_dim: object = None,
    epochs: int = 2,
    micro_batches: int = 1,
    rotate: bool = False,
    **options: object,
) -> None:
    """Two epochs of 4 steps over 16 examples (batch 4, in ``micro_batches`` accumulated parts), shards
    of 3 steps, float64."""
    model = mlp(inputs=5, hidden=4, classes=3)
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    rec = dvemb.Recorder(
        model,
        log_dir,
        proj_dim=proj_dim,
        dtype="float64",
        shard_steps=3,
        curvature=curvature,
        loss_reduction=reduction,
        **options,  # type: ignore[arg-type]
    )
    if rotate:  # full-rank bases that rotate every side: the projection changes coordinates, loses nothing
        rec.calibrate([(x[:8], y[:8])], keep_whole_sides=False)
    for _ in range(epochs):
        order = torch.randperm(16)
        for b in range(4):
            ids = order[4 * b : 4 * b + 4]
            with rec.step(ids, optimizer):
                for part in ids.chunk(micro_batches):
                    logits = model(x[part])
                    if curvature == "ggn":
                        rec.curvature(logits)
                    loss = F.cross_entropy(logits, y[part], reduction=reduction)
                    (loss * len(part) / len(ids) if reduction == "mean" else loss).backward()
                optimizer.step()
                optimizer.zero_grad()
            scheduler.step()
    rec.record_queries("val", [(torch.randn(6, 5), torch.randint(0, 3, (6,)))])
    rec.close()


def _naive_reconstruction(precond: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(S, N, k) per step, written out: ``C P (P^T C P)^-1`` with ``C = diag(precond^-2)`` (the expectation of a
    gradient with covariance C given its projection), with the engine's small ridge."""
    out = []
    for row in precond.double().reciprocal().square():
        den = p.T @ torch.diag(row) @ p
        den = den + 1e-30 * den.diagonal().mean() * torch.eye(p.shape[1], dtype=torch.float64)
        out.append(torch.diag(row) @ p @ torch.linalg.inv(den))
    return torch.stack(out)


def _embeddings(log_dir: Path, out: Path, **kwargs: object) -> tuple[np.ndarray, dict[str, object]]:
    summary = compute(log_dir, out, ComputeArguments(accumulate_dtype="float64", **kwargs))  # type: ignore[arg-type]
    return np.load(out / "embeddings.npy"), summary


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(("curvature", "reduction"), [("ggn", "mean"), ("empirical", "sum")])
def test_full_vector_equals_naive_forward_reference(tmp_path: Path, name: str, curvature: str, reduction: str) -> None:
    _record(tmp_path / "log", OPTIMIZERS[name], curvature=curvature, reduction=reduction)
    emb, summary = _embeddings(tmp_path / "log", tmp_path / "out", blocks="full")
    expected = torch.cat(removal_effects(tmp_path / "log")).numpy()
    assert summary["propagation"] == ("adamw" if name == "adamw" else "adam" if name == "adam" else "momentum")
    assert summary["sgd_proxy"] is False and summary["note"] is None
    assert np.abs(expected).max() > 1e-3  # the comparison is not between zeros
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize(("name", "micro_batches"), [("nesterov", 1), ("adamw", 1), ("adam", 2)])
def test_layer_blocks_equal_reference_per_layer(tmp_path: Path, name: str, micro_batches: int) -> None:
    _record(tmp_path / "log", OPTIMIZERS[name], micro_batches=micro_batches)
    emb, _ = _embeddings(tmp_path / "log", tmp_path / "out", blocks="layer")
    log = dvemb.open_log(tmp_path / "log")
    offset = 0
    for layer in log.layers:
        expected = torch.cat(removal_effects(tmp_path / "log", [layer.name])).numpy()
        got = emb[:, offset : offset + layer.dim]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
        offset += layer.dim


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_adam_without_the_second_moment_term_equals_reference_without_it(tmp_path: Path, blocks: str) -> None:
    _record(tmp_path / "log", OPTIMIZERS["adamw"])
    emb, _ = _embeddings(tmp_path / "log", tmp_path / "out", blocks=blocks, second_moment=False)
    log = dvemb.open_log(tmp_path / "log")
    groups = [None] if blocks == "full" else [[layer.name] for layer in log.layers]
    expected = np.concatenate(
        [torch.cat(removal_effects(tmp_path / "log", names, second_moment=False)).numpy() for names in groups], 1
    )
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    with_term = torch.cat(removal_effects(tmp_path / "log")).numpy() if blocks == "full" else None
    if with_term is not None:  # the term is not negligible: leaving it out changes the embeddings
        assert np.abs(with_term - expected).max() > 1e-3 * np.abs(expected).max()


def test_resume_after_every_shard_equals_one_run(tmp_path: Path) -> None:
    _record(tmp_path / "log", OPTIMIZERS["adam"])
    whole, _ = _embeddings(tmp_path / "log", tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop(progress: object) -> None:
        raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        compute(tmp_path / "log", out, ComputeArguments(accumulate_dtype="float64"), progress=stop)
    resumed, _ = _embeddings(tmp_path / "log", out)
    np.testing.assert_allclose(resumed, whole, rtol=0, atol=1e-12 * np.abs(whole).max())


def test_adam_differs_from_its_sgd_proxy(tmp_path: Path) -> None:
    """The propagation is switchable, and switching it changes the answer (the proxy is not the map)."""
    _record(tmp_path / "log", OPTIMIZERS["adam"])
    exact, _ = _embeddings(tmp_path / "log", tmp_path / "exact")
    proxy, summary = _embeddings(tmp_path / "log", tmp_path / "proxy", propagation="sgd-proxy")
    assert summary["propagation"] == "proxy" and "sgd-proxy" in str(summary["note"])
    assert np.abs(exact - proxy).max() > 0.1 * np.abs(exact).max()


def test_recorded_adam_state_is_the_optimizers(tmp_path: Path) -> None:
    """The preconditioner of an unprojected layer is 1/(sqrt(v_hat)+eps) exactly; a projected layer
    keeps the row and column sums of v_hat (bias column last)."""
    model = mlp(inputs=5, hidden=4, classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim={"0": (2, 3), "*": None}, dtype="float64")
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for step in range(3):
        with rec.step(list(range(8 * step, 8 * step + 8)), optimizer):
            F.cross_entropy(model(x), y).backward()
            last = model[2]
            gamma = torch.cat([last.weight.grad + 0.1 * last.weight, (last.bias.grad + 0.1 * last.bias)[:, None]], 1)
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    shard = next(dvemb.open_log(tmp_path / "log").iter_shards())
    bc2 = 1 - 0.99**3
    v_last = torch.cat(
        [optimizer.state[model[2].weight]["exp_avg_sq"], optimizer.state[model[2].bias]["exp_avg_sq"][:, None]], 1
    )
    precond = shard.optimizer[fmt.optimizer_layer_key("precond", "2")][-1]
    torch.testing.assert_close(precond, (1 / ((v_last / bc2).sqrt() + 1e-6)).flatten(), rtol=1e-12, atol=0)
    m_last = torch.cat([optimizer.state[last.weight]["exp_avg"], optimizer.state[last.bias]["exp_avg"][:, None]], 1)
    vsens = (m_last / (1 - 0.9**3)) / ((v_last / bc2).sqrt() + 1e-6) ** 2 / (2 * (v_last / bc2).sqrt() * bc2)
    torch.testing.assert_close(shard.optimizer[fmt.optimizer_layer_key("vsens", "2")][-1], vsens.flatten())
    torch.testing.assert_close(
        shard.optimizer[fmt.optimizer_layer_key("batch_grad", "2")][-1], gamma.detach().flatten()
    )
    v_first = torch.cat(
        [optimizer.state[model[0].weight]["exp_avg_sq"], optimizer.state[model[0].bias]["exp_avg_sq"][:, None]], 1
    )
    torch.testing.assert_close(shard.optimizer[fmt.optimizer_layer_key("v_row", "0")][-1], (v_first / bc2).sum(1))
    torch.testing.assert_close(shard.optimizer[fmt.optimizer_layer_key("v_col", "0")][-1], (v_first / bc2).sum(0))
    assert shard.optimizer["opt.step"][:, 0].tolist() == [1.0, 2.0, 3.0]


def test_projected_adam_computes_and_matches_exact_when_projection_is_whole(tmp_path: Path) -> None:
    """The Kronecker preconditioner of a projected layer reduces to Adafactor's diagonal when nothing
    is projected; with a real projection the run computes finite embeddings."""
    _record(tmp_path / "log", OPTIMIZERS["adam"], proj_dim=(2, 3))
    emb, summary = _embeddings(tmp_path / "log", tmp_path / "out")
    assert summary["propagation"] == "adam" and np.isfinite(emb).all() and np.abs(emb).max() > 0


def test_kronecker_preconditioner_of_an_identity_projection_is_adafactor() -> None:
    from dvemb.engine.optimizer_maps import kronecker_preconditioner

    v = torch.rand(2, 4, 3) + 0.1  # (S, out, in)
    a, b = kronecker_preconditioner(v.sum(2), v.sum(1), torch.eye(4), torch.eye(3))
    total = v.sum((1, 2))
    for s in range(2):
        approx = 1 / (v[s].sum(1)[:, None] * v[s].sum(0)[None, :] / total[s]).sqrt()
        torch.testing.assert_close(torch.kron(a[s], b[s]), torch.diag(approx.flatten()), rtol=1e-8, atol=1e-12)


def test_amsgrad_and_lion_like_optimizers_use_the_proxy_and_say_why(tmp_path: Path) -> None:
    model = mlp(inputs=5, hidden=4, classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None)
    with pytest.warns(dvemb.DvembWarning, match="amsgrad"):
        _one_step(rec, optimizer, model)
    rec.record_queries("val", [(torch.randn(2, 5), torch.tensor([0, 1]))])
    rec.close()
    _, summary = _embeddings(tmp_path / "log", tmp_path / "out")
    assert summary["propagation"] == "proxy" and "amsgrad" in str(summary["note"])
    with pytest.raises(dvemb.ConfigError, match="propagation='optimizer'"):
        compute(tmp_path / "log", tmp_path / "out2", ComputeArguments(propagation="optimizer"))


def test_version_1_log_computes_with_the_proxy(tmp_path: Path) -> None:
    """A log written before format version 2 (no optimizer state) still loads and computes."""
    _record(tmp_path / "log", OPTIMIZERS["momentum"], epochs=1)
    manifest_path = tmp_path / "log" / fmt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 1
    for key in ("propagation", "proxy_reason", "nesterov", "layer_groups"):
        manifest["optimizer"].pop(key)
    manifest_path.write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb, summary = _embeddings(tmp_path / "log", tmp_path / "out")
    assert summary["propagation"] == "proxy" and "version 1" in str(summary["note"])
    assert np.isfinite(emb).all()


def test_step_without_optimizer_step_is_a_clear_error(tmp_path: Path) -> None:
    model = mlp(inputs=5, hidden=4, classes=3)
    optimizer = torch.optim.Adam(model.parameters())
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None)
    with pytest.raises(dvemb.RecorderError, match="optimizer.step"), rec.step([0, 1], optimizer):
        F.cross_entropy(model(torch.randn(2, 5)), torch.tensor([0, 1])).backward()


def _one_step(rec: dvemb.Recorder, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    with rec.step([0, 1], optimizer):
        F.cross_entropy(model(torch.randn(2, 5)), torch.tensor([0, 1])).backward()
        optimizer.step()


def test_unknown_propagation_in_a_manifest_is_a_clear_error_before_any_work(tmp_path: Path) -> None:
    _record(tmp_path / "log", OPTIMIZERS["adam"], epochs=1)
    manifest_path = tmp_path / "log" / fmt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["optimizer"]["propagation"] = "lion"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(dvemb.LogFormatError, match="propagation 'lion'"):
        compute(tmp_path / "log", tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_projected_second_moment_is_exact_with_full_rank_bases(tmp_path: Path, name: str) -> None:
    """Full-rank rotated bases (every side projected onto all its eigenvectors), both Adam moments lifted: the
    projected propagation equals the unprojected forward reference with the exact preconditioner and the
    second-moment term, by default (the lifted states are small here); turned off, it differs."""
    torch.manual_seed(0)
    _record(tmp_path / "whole", OPTIMIZERS[name])
    torch.manual_seed(0)
    _record(tmp_path / "rotated", OPTIMIZERS[name], proj_dim=(8, 8), rotate=True)
    rotated = dvemb.open_log(tmp_path / "rotated")
    assert [entry["second_moment"] for entry in rotated.manifest["layers"]] == ["lifted-moments", "lifted-moments"]
    emb, _ = _embeddings(tmp_path / "rotated", tmp_path / "out", blocks="layer")
    without, _ = _embeddings(tmp_path / "rotated", tmp_path / "out-no-v", blocks="layer", second_moment_lifted=False)
    offset = 0
    for layer in rotated.layers:
        p = layer.projection
        assert p.basis_out is not None and p.basis_in is not None and p.k_out == p.out_dim and p.k_in == p.in_dim
        full = torch.kron(p.basis_out, p.basis_in)  # (D, D) orthogonal: x~ = full^T x
        effects = removal_effects(tmp_path / "whole", [layer.name])  # the exact preconditioner, unprojected
        expected = (torch.cat(effects) @ full).numpy()
        got = emb[:, offset : offset + layer.dim]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
        assert np.abs(without[:, offset : offset + layer.dim] - expected).max() > 1e-3 * np.abs(expected).max()
        offset += layer.dim


def test_second_moment_factors_reconstruct_the_recorded_matrices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer over ``LIFTED_SECOND_MOMENT_MAX`` keeps singular pairs instead: at full rank they give back vsens
    and the batch gradient of the whole log, and the engine's scores equal the lifted log's."""
    torch.manual_seed(0)
    _record(tmp_path / "whole", OPTIMIZERS["adam"])
    torch.manual_seed(0)
    _record(tmp_path / "lifted", OPTIMIZERS["adam"], proj_dim=(8, 8), rotate=True)
    monkeypatch.setattr(dvemb.optim, "LIFTED_SECOND_MOMENT_MAX", 0)
    torch.manual_seed(0)
    _record(tmp_path / "rotated", OPTIMIZERS["adam"], proj_dim=(8, 8), rotate=True, second_moment_rank=8)
    whole, rotated = (
        next(dvemb.open_log(tmp_path / "whole").iter_shards()),
        next(dvemb.open_log(tmp_path / "rotated").iter_shards()),
    )
    assert [layer["second_moment"] for layer in dvemb.open_log(tmp_path / "rotated").manifest["layers"]] == [
        "factors",
        "factors",
    ]
    for name, shape in (("0", (4, 6)), ("2", (3, 5))):
        assert fmt.optimizer_layer_key("vsens", name) not in rotated.optimizer
        for (left, right), flat in zip(fmt.SECOND_MOMENT_FACTORS, ("vsens", "batch_grad"), strict=True):
            factors_l = rotated.optimizer[fmt.optimizer_layer_key(left, name)]  # (S, R, out)
            factors_r = rotated.optimizer[fmt.optimizer_layer_key(right, name)]  # (S, R, in)
            rebuilt = torch.einsum("sro,sri->soi", factors_l, factors_r).flatten(1)
            expected = whole.optimizer[fmt.optimizer_layer_key(flat, name)]
            assert factors_l.shape[1] == min(shape)
            torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize(("name", "blocks"), [("adam", "layer"), ("adamw", "full")])
def test_projected_second_moment_follows_the_layers_own_coordinates(tmp_path: Path, name: str, blocks: str) -> None:
    """Projected layers (random 2 x 3 bases, not full rank): the second moment's change is carried over each
    layer's own coordinates (``dv = nu * P dgamma``, read back as ``P^T (sigma * dv)``), as the naive forward
    reference computes it; the recorder keeps the sensitivity and gradient whole for these small layers."""
    _record(tmp_path / "log", OPTIMIZERS[name], proj_dim=(2, 3), projection="random")
    log = dvemb.open_log(tmp_path / "log")
    assert [entry["second_moment"] for entry in log.manifest["layers"]] == ["lifted-moments", "lifted-moments"]
    emb, summary = _embeddings(tmp_path / "log", tmp_path / "out", blocks=blocks, second_moment_lifted=True)
    default, _ = _embeddings(tmp_path / "log", tmp_path / "out-default", blocks=blocks)  # small states: carried
    np.testing.assert_array_equal(default, emb)
    without, off = _embeddings(tmp_path / "log", tmp_path / "out-no-v", blocks=blocks, second_moment_lifted=False)
    dropped = [a for a in off["approximations"] if a["kind"] == "second-moment-dropped"]  # type: ignore[union-attr]
    assert len(dropped) == 1 and "second_moment_lifted=False" in dropped[0]["detail"]
    kinds = [a["kind"] for a in summary["approximations"]]  # type: ignore[union-attr]
    assert "second-moment-dropped" not in kinds
    shards = list(log.iter_shards())
    opt = {k: torch.cat([shard.optimizer[k] for shard in shards]) for k in shards[0].optimizer}
    lifts, reconstructions, preconditioners = [], [], []  # reconstructions: per step (S, N, k)
    for layer in log.layers:
        p = layer.projection
        cpu = torch.device("cpu")
        p_out, p_in = p.p_out(dtype=torch.float64, device=cpu), p.p_in(dtype=torch.float64, device=cpu)
        v_row = opt[fmt.optimizer_layer_key("v_row", layer.name)]
        v_col = opt[fmt.optimizer_layer_key("v_col", layer.name)]
        preconditioners.append(kronecker_preconditioner(v_row, v_col, p_out, p_in))
        lifts.append(torch.kron(p_out, p_in))
        precond = opt[fmt.optimizer_layer_key("precond", layer.name)]
        reconstructions.append(_naive_reconstruction(precond, lifts[-1]))

    def lift_in(k: int, layers: list[int]) -> torch.Tensor:
        return torch.block_diag(*[reconstructions[i][k] for i in layers])

    if blocks == "layer":
        expected = np.concatenate(
            [
                torch.cat(
                    removal_effects(
                        tmp_path / "log",
                        [layer.name],
                        preconditioner=lambda k, a=a, b=b: torch.kron(a[k], b[k]),  # type: ignore[misc]
                        lift=lifts[i],
                        lift_in=lambda k, i=i: lift_in(k, [i]),  # type: ignore[misc]
                    )
                ).numpy()
                for i, (layer, (a, b)) in enumerate(zip(log.layers, preconditioners, strict=True))
            ],
            1,
        )
    else:
        expected = torch.cat(
            removal_effects(
                tmp_path / "log",
                preconditioner=lambda k: torch.block_diag(*[torch.kron(a[k], b[k]) for a, b in preconditioners]),
                lift=torch.block_diag(*lifts),
                lift_in=lambda k: lift_in(k, list(range(len(lifts)))),
            )
        ).numpy()
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert np.abs(without - expected).max() > 1e-3 * np.abs(expected).max()  # the term is carried, not dropped


def test_the_default_carries_the_lifted_term_only_while_its_states_are_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the term is carried while the lifted states hold at most LIFT_AUTO_RATIO times the recursion's
    own (the ratio computed from the manifest, the bound moved just below and just above it); past it the
    default equals turning it off, the results say why and how to carry it anyway, and asking for it
    explicitly still carries it."""
    import dvemb.engine.optimizer_maps as maps

    _record(tmp_path / "log", OPTIMIZERS["adam"], proj_dim=(2, 3), projection="random")
    lifted, _ = _embeddings(tmp_path / "log", tmp_path / "lifted", blocks="layer", second_moment_lifted=True)
    off, _ = _embeddings(tmp_path / "log", tmp_path / "off", blocks="layer", second_moment_lifted=False)
    manifest = dvemb.open_log(tmp_path / "log").manifest
    layers = manifest["layers"]
    sizes = [layer["out_dim"] * layer["in_dim"] for layer in layers]
    dims = [layer["k_out"] * layer["k_in"] for layer in layers]
    ratio = maps.lift_ratio(sizes, dims, sum(d * d for d in dims))
    assert ratio > 1
    monkeypatch.setattr(maps, "LIFT_AUTO_RATIO", ratio * 0.99)
    capped, summary = _embeddings(tmp_path / "log", tmp_path / "capped", blocks="layer")
    np.testing.assert_array_equal(capped, off)
    dropped = [a for a in summary["approximations"] if a["kind"] == "second-moment-dropped"]  # type: ignore[union-attr]
    assert len(dropped) == 1
    assert f"{ratio:.0f}x the recursion's own" in dropped[0]["detail"]
    assert "second_moment_lifted=True" in dropped[0]["detail"]
    asked, _ = _embeddings(tmp_path / "log", tmp_path / "asked", blocks="layer", second_moment_lifted=True)
    np.testing.assert_array_equal(asked, lifted)
    monkeypatch.setattr(maps, "LIFT_AUTO_RATIO", ratio * 1.01)
    within, summary = _embeddings(tmp_path / "log", tmp_path / "within", blocks="layer")
    np.testing.assert_array_equal(within, lifted)
    assert "second-moment-dropped" not in [a["kind"] for a in summary["approximations"]]  # type: ignore[union-attr]


def test_the_lifted_state_is_bounded_and_what_is_left_out_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifted states of a computation hold at most LIFT_STATE_MAX numbers: past it, in layer order, a layer's
    term is left out (its block then equals the computation without the term), and the results say so."""
    import dvemb.engine.optimizer_maps as maps

    _record(tmp_path / "log", OPTIMIZERS["adam"], proj_dim=(2, 3), projection="random")
    carried, _ = _embeddings(tmp_path / "log", tmp_path / "all", blocks="layer", second_moment_lifted=True)
    without, _ = _embeddings(tmp_path / "log", tmp_path / "none", blocks="layer", second_moment=False)
    monkeypatch.setattr(maps, "LIFT_STATE_MAX", 24 * 6 + 1)  # layer 0's (24 coordinates x 6) fits, layer 2's not
    bounded, summary = _embeddings(tmp_path / "log", tmp_path / "bounded", blocks="layer", second_moment_lifted=True)
    np.testing.assert_array_equal(bounded[:, :6], carried[:, :6])
    np.testing.assert_array_equal(bounded[:, 6:], without[:, 6:])
    assert np.abs(carried[:, 6:] - without[:, 6:]).max() > 0  # the left-out term did matter
    dropped = [a for a in summary["approximations"] if a["kind"] == "second-moment-dropped"]  # type: ignore[union-attr]
    assert len(dropped) == 1 and "in 1 projected layer(s) of 2" in dropped[0]["detail"]


@pytest.mark.parametrize("shape", [(20, 10, 5, 2), (5, 2, 20, 10), (6, 3, 6, 3)])
def test_kronecker_lift_and_projection_equal_the_written_out_product_in_either_order(
    shape: tuple[int, int, int, int],
) -> None:
    """``P X`` and ``P^T Z`` through the two sides (the cheaper side first, so both orders are taken across these
    shapes) equal the product with ``kron(P_out, P_in)`` written out."""
    from dvemb.engine.optimizer_recursion import _lift_rows, _project_rows

    n_out, k_out, n_in, k_in = shape
    gen = torch.Generator().manual_seed(0)
    p_out = torch.randn(2, n_out, k_out, generator=gen, dtype=torch.float64)
    p_in = torch.randn(2, n_in, k_in, generator=gen, dtype=torch.float64)
    x = torch.randn(2, k_out * k_in, 7, generator=gen, dtype=torch.float64)
    z = torch.randn(2, n_out * n_in, 7, generator=gen, dtype=torch.float64)
    full = torch.stack([torch.kron(a, b) for a, b in zip(p_out, p_in, strict=True)])
    torch.testing.assert_close(_lift_rows((p_out, p_in), x), full @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_project_rows((p_out, p_in), z), full.transpose(1, 2) @ z, rtol=1e-12, atol=1e-12)
