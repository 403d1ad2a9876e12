"""Calibrated (curvature-aware) projections: reproducible from the log, exact at full rank, and
what the recorder refuses."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp
from safetensors.torch import load_file

import dvemb
from dvemb import logformat as fmt
from dvemb.calibration import (
    MAX_FITTED_SIDE,
    FactorCovariance,
    best_split,
    calibrated_projection,
    captured,
    top_eigenvectors,
)
from dvemb.engine import ComputeArguments, compute
from dvemb.projection import LayerProjection


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _record(
    log_dir: Path,
    *,
    calibrate: bool,
    proj_dim: object = (2, 3),
    keep_whole_sides: bool = True,
    optimizer: str = "sgd",
    loss_fn: object = None,
) -> torch.nn.Module:
    """8 steps of batch 6 (sum loss, ggn, float64) after an optional calibration on 4 batches."""
    torch.manual_seed(0)
    model = mlp(inputs=5, hidden=4, classes=3)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
        if optimizer == "momentum"
        else torch.optim.SGD(model.parameters(), lr=0.3)
    )
    x, y = _data()
    rec = dvemb.Recorder(
        model,
        log_dir,
        proj_dim=proj_dim,
        dtype="float64",
        curvature="ggn",
        loss_reduction="sum",
        shard_steps=3,
        projection="calibrated" if calibrate else "random",
    )
    if calibrate:
        used = rec.calibrate(
            [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)],
            keep_whole_sides=keep_whole_sides,
            loss_fn=loss_fn,  # type: ignore[arg-type]
        )
        assert used == 24
    for step in range(8):
        ids = list(range(6 * step, 6 * step + 6))
        with rec.step(ids, opt):
            logits = model(x[ids])
            rec.curvature(logits)
            F.cross_entropy(logits, y[ids], reduction="sum").backward()
            opt.step()
            opt.zero_grad()
    rec.record_queries("val", [(x[:5], y[:5])])
    rec.close()
    return model


def test_bases_are_the_top_eigenvectors_of_gradient_weighted_factor_covariances(tmp_path: Path) -> None:
    """Against a naive build: per-example gradients G = delta a^T of each curvature row, sum G G^T and G^T G."""
    _record(tmp_path / "log", calibrate=True)
    torch.manual_seed(0)
    model = mlp(inputs=5, hidden=4, classes=3)  # the same initial model
    x, _ = _data()
    layer = model[0]
    acts: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: acts.append(torch.cat([a[0], torch.ones(len(a[0]), 1)], 1)))
    left, right = torch.zeros(4, 4), torch.zeros(6, 6)
    for i in range(0, 24, 6):
        out = model[0](x[i : i + 6])
        logits = model[2](torch.relu(out))  # not the in-place ReLU: out must stay the layer output
        p = torch.softmax(logits, 1)
        for c in range(3):  # all-class Gauss-Newton rows: sqrt(p_c) (p - e_c)
            row = p.sqrt()[:, c : c + 1] * (p - F.one_hot(torch.full((6,), c), 3))
            (delta,) = torch.autograd.grad(logits, out, grad_outputs=row.detach(), retain_graph=True)
            for b in range(6):
                g = delta[b][:, None] * acts[-1][b][None, :]  # (4, 6) per-example gradient of this row
                left += g @ g.T
                right += g.T @ g
    handle.remove()
    stored = load_file(str(tmp_path / "log" / fmt.PROJECTION_FILE))
    torch.testing.assert_close(stored[fmt.basis_key("out", "0")], top_eigenvectors(left, 2), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(stored[fmt.basis_key("in", "0")], top_eigenvectors(right, 3), rtol=1e-8, atol=1e-10)


def test_calibrated_projection_is_reproducible_from_the_log(tmp_path: Path) -> None:
    """Queries projected later from the log alone equal the ones the recorder stored."""
    model = _record(tmp_path / "log", calibrate=True)
    log = dvemb.open_log(tmp_path / "log")
    assert log.manifest["projection"]["kind"] == "calibrated"
    assert all(layer.projection.calibrated for layer in log.layers)
    stored = log.load_query_set("val")
    x, y = _data()
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        projected = dvemb.project_model_gradient(log, model)
        for name, vector in projected.items():
            torch.testing.assert_close(vector, stored.grads[name][i], rtol=1e-10, atol=1e-12)
    with pytest.raises(dvemb.ConfigError, match="calibrated"):
        dvemb.project_model_gradient(log.manifest, model)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_full_rank_calibrated_bases_give_the_unprojected_scores(tmp_path: Path, optimizer: str) -> None:
    """Bases of full rank rotate each layer's space: every dot product, hence every score, is unchanged."""
    _record(tmp_path / "whole", calibrate=False, proj_dim=None, optimizer=optimizer)
    _record(tmp_path / "rotated", calibrate=True, proj_dim=(100, 100), keep_whole_sides=False, optimizer=optimizer)
    rotated_log = dvemb.open_log(tmp_path / "rotated")
    assert all(not layer.projection.is_identity for layer in rotated_log.layers)
    results = {}
    for name in ("whole", "rotated"):
        compute(tmp_path / name, tmp_path / f"out-{name}", ComputeArguments(accumulate_dtype="float64"))
        results[name] = np.load(tmp_path / f"out-{name}" / "scores-val.npy")
    whole, rotated = results["whole"], results["rotated"]
    assert np.abs(whole).max() > 1e-3
    np.testing.assert_allclose(rotated, whole, rtol=0, atol=1e-10 * np.abs(whole).max())
    # and the rotation is real: the stored gradients differ from the unprojected ones
    a = next(dvemb.open_log(tmp_path / "whole").iter_shards()).grads["0"]
    b = next(rotated_log.iter_shards()).grads["0"]
    assert (a - b).abs().max() > 1e-3


def test_calibration_with_a_loss_function_and_covariance_sums() -> None:
    cov = FactorCovariance(2, 3)
    u, v = torch.randn(4, 1, 2), torch.randn(4, 1, 3)
    cov.add_gradient(u, v)
    g = u[:, 0, :, None] * v[:, 0, None, :]  # (4, 2, 3)
    torch.testing.assert_close(cov.out_cov, torch.einsum("boi,bpi->op", g, g).double())
    torch.testing.assert_close(cov.in_cov, torch.einsum("boi,boj->ij", g, g).double())


def test_one_hot_factors_and_sides_too_large_to_fit() -> None:
    """An embedding's token side: sum w e_i e_i^T built from indices equals the explicit one-hot sum; negative
    indices (padding) add nothing. A side over MAX_FITTED_SIDE holds no covariance and keeps its seeded
    projection."""
    cov = FactorCovariance(5, 2)
    tokens = torch.tensor([[1, 3, -1], [3, 0, 4]])
    weights = torch.rand(2, 3, dtype=torch.float64)
    cov.add_one_hot("out", tokens, weights)
    one_hot = F.one_hot(tokens.clamp(min=0), 5).double() * (tokens >= 0).unsqueeze(-1)
    expected = torch.einsum("blv,blw,bl->vw", one_hot, one_hot, weights)
    assert cov.out_cov is not None
    torch.testing.assert_close(cov.out_cov, expected, rtol=1e-14, atol=0)
    wide = FactorCovariance(MAX_FITTED_SIDE + 1, 3)
    assert wide.out_cov is None and wide.matrices() == [wide.in_cov]
    wide.add_gradient(torch.randn(2, 1, MAX_FITTED_SIDE + 1), torch.randn(2, 1, 3))
    projection = LayerProjection(MAX_FITTED_SIDE + 1, 3, 4, 2, seed_out=5, seed_in=6)
    fitted = calibrated_projection(projection, wide)
    assert fitted.basis_out is None and fitted.basis_in is not None and fitted.calibrated
    assert torch.equal(
        fitted.p_out(dtype=torch.float64, device=torch.device("cpu")),
        projection.p_out(dtype=torch.float64, device=torch.device("cpu")),
    )


def test_the_budget_goes_to_the_side_whose_spectrum_spreads() -> None:
    """An int proj_dim is a budget: the split maximises the kept energy share_out(k_out) * share_in(k_in)
    (checked against every split), so a vocabulary side with a flat spectrum gets more than a hidden side
    whose energy sits in a few directions; a side without a covariance counts as k / dim."""
    flat = torch.ones(40, dtype=torch.float64)
    steep = 0.3 ** torch.arange(12, dtype=torch.float64)
    out_share, in_share = captured(flat, 40), captured(steep, 12)
    k_out, k_in = best_split(out_share, in_share, 64)
    brute = max(((a, min(12, 64 // a)) for a in range(1, 41)), key=lambda ab: float(out_share[ab[0]] * in_share[ab[1]]))
    assert (k_out, k_in) == brute and k_out > k_in and k_out * k_in <= 64
    torch.testing.assert_close(captured(None, 4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    cov = FactorCovariance(40, 12)
    assert cov.out_cov is not None and cov.in_cov is not None
    cov.out_cov += torch.diag(flat)
    cov.in_cov += torch.diag(steep)
    projection = calibrated_projection(LayerProjection(40, 12, 8, 8, seed_out=1, seed_in=2), cov, budget=64)
    assert (projection.k_out, projection.k_in) == (k_out, k_in)
    assert projection.basis_out is not None and projection.basis_out.shape == (40, k_out)


def test_a_layer_whose_gradient_fits_the_budget_is_stored_whole(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=64, projection="random")
    shapes = [(a.projection.k_out, a.projection.k_in, a.projection.is_identity) for a in rec.layers]
    assert shapes == [(8, 7, False), (3, 21, True)]  # 20 x 7 = 140 > 64; 3 x 21 = 63 <= 64
    rec.close()


def test_loss_gradients_can_define_the_out_side(tmp_path: Path) -> None:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    _record(tmp_path / "log", calibrate=True, loss_fn=loss)
    assert dvemb.open_log(tmp_path / "log").manifest["projection"]["calibration"]["factors"] == "loss"


def test_what_the_recorder_refuses(tmp_path: Path) -> None:
    x, y = _data()
    model = mlp(inputs=5, hidden=4, classes=3)
    rec = dvemb.Recorder(model, tmp_path / "a", proj_dim=(2, 3), projection="calibrated")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(dvemb.RecorderError, match="calibrate"), rec.step([0], optimizer):
        pass
    rec.close()
    rec = dvemb.Recorder(model, tmp_path / "b", proj_dim=(2, 3), projection="random")
    with pytest.raises(dvemb.ConfigError, match="random"):
        rec.calibrate([(x, y)])
    rec.close()
    rec = dvemb.Recorder(model, tmp_path / "c", proj_dim=(2, 3), calibration_steps=0)
    with pytest.warns(dvemb.DvembWarning, match="random projection"):
        _step(rec, optimizer, model, x, y)
    with pytest.raises(dvemb.RecorderError, match="before the first"):
        rec.calibrate([(x, y)])
    rec.close()
    rec = dvemb.Recorder(model, tmp_path / "d", proj_dim=(2, 3))
    rec.calibrate([(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no advice to give
        _step(rec, optimizer, model, x, y)
    rec.close()


def _step(
    rec: dvemb.Recorder, optimizer: torch.optim.Optimizer, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> None:
    with rec.step(list(range(len(x))), optimizer):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_look_ahead_calibration_restores_the_model_and_optimizer_exactly(tmp_path: Path) -> None:
    """Bases are fitted a few optimizer steps into training, then everything is put back: the recorded run
    is bit for bit the run without calibration, and the bases differ from those fitted at initialisation."""
    x, y = _data()
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]

    def run(name: str, lookahead: int | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = mlp(inputs=5, hidden=4, classes=3)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        rec = dvemb.Recorder(
            model, tmp_path / name, proj_dim=(2, 3), projection="auto" if lookahead is None else "calibrated"
        )
        if lookahead is not None:
            rec.calibrate(batches, optimizer=optimizer, lookahead_steps=lookahead)
        params = []
        for step in range(4):
            with rec.step(list(range(6 * step, 6 * step + 6)), optimizer):
                F.cross_entropy(model(x[6 * step : 6 * step + 6]), y[6 * step : 6 * step + 6]).backward()
                optimizer.step()
                optimizer.zero_grad()
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        rec.close()
        bases = load_file(str(tmp_path / name / fmt.PROJECTION_FILE)) if lookahead is not None else {}
        return params, bases

    plain, _ = run("plain", None)
    ahead, ahead_bases = run("ahead", 6)
    _, init_bases = run("init", 0)
    assert all(torch.equal(a, b) for a, b in zip(plain, ahead, strict=True))
    assert (ahead_bases[fmt.basis_key("in", "0")] - init_bases[fmt.basis_key("in", "0")]).abs().max() > 1e-3
    rec = dvemb.Recorder(mlp(inputs=5, hidden=4, classes=3), tmp_path / "bad", proj_dim=(2, 3))
    with pytest.raises(dvemb.ConfigError, match="optimizer"):
        rec.calibrate(batches, lookahead_steps=3)
    rec.close()


@pytest.mark.parametrize("kind", ["lm", "cnn"])
def test_sequence_conv_and_embedding_layers_with_adam(tmp_path: Path, kind: str) -> None:
    """Sequence inputs (sampled-label rows), Conv2d windows and an Embedding (its token side from one-hot
    factors) calibrate, record under Adam, compute, and queries projected later from the log equal the
    recorded ones."""
    from core_models import TinyCNN, TinyLM

    torch.manual_seed(0)
    if kind == "lm":
        model: torch.nn.Module = TinyLM(vocab=7, width=4, hidden=5)
        x = torch.randint(1, 7, (24, 6))
        y = torch.randint(0, 7, (24, 6))
        proj: object = (2, 3)
    else:
        model = TinyCNN()
        x, y = torch.randn(24, 2, 4, 4), torch.randint(0, 3, (24,))
        proj = (2, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=proj, layers="all", dtype="float64", curvature_samples=2)
    rec.calibrate([(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)], optimizer=optimizer, lookahead_steps=2)
    for step in range(3):
        ids = list(range(8 * step, 8 * step + 8))
        with rec.step(ids, optimizer):
            out = model(x[ids])
            F.cross_entropy(out.flatten(0, -2), y[ids].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(x[:3], y[:3])])
    rec.close()
    log = dvemb.open_log(tmp_path / "log")
    kinds = {layer.name: (layer.kind, layer.projection.calibrated) for layer in log.layers}
    assert all(calibrated for _, calibrated in kinds.values()), kinds
    summary = compute(tmp_path / "log", tmp_path / "out", ComputeArguments(accumulate_dtype="float64"))
    assert summary["propagation"] == "adam" and np.isfinite(np.load(tmp_path / "out" / "embeddings.npy")).all()
    stored = log.load_query_set("val")
    model.zero_grad()
    out = model(x[1:2])
    F.cross_entropy(out.flatten(0, -2), y[1:2].flatten()).backward()
    for name, vector in dvemb.project_model_gradient(log, model).items():
        torch.testing.assert_close(vector, stored.grads[name][1], rtol=1e-8, atol=1e-10)


def test_a_damaged_projection_file_is_refused_by_name(tmp_path: Path) -> None:
    """A flipped byte in the bases (or a missing file) is an error naming the file, not silent noise."""
    _record(tmp_path / "log", calibrate=True)
    path = tmp_path / "log" / fmt.PROJECTION_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(dvemb.ChecksumError, match="projection.safetensors"):
        _ = dvemb.open_log(tmp_path / "log").layers
    path.unlink()
    with pytest.raises(dvemb.LogFormatError, match="missing"):
        _ = dvemb.open_log(tmp_path / "log").layers
