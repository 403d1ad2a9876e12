"""Without rec.calibrate(), the recorder fits its projection bases on the first steps it holds unprojected."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TiedLM, mlp
from torch import nn

import dvemb
from dvemb.calibration import top_eigenvectors


def _train(model: nn.Module, log_dir: Path | None, steps: int = 5, **options: object) -> None:
    """SGD with momentum on fixed batches, recorded with the recorder's defaults plus ``options``."""
    generator = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)) for _ in range(steps)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = None if log_dir is None else dvemb.Recorder(model, log_dir, dtype="float64", **options)  # type: ignore[arg-type]
    for step, (x, y) in enumerate(data):
        ids = list(range(4 * step, 4 * step + 4))
        if rec is None:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            continue
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    if rec is not None:
        rec.record_queries("q", [(data[0][0], data[0][1])])
        rec.close()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return mlp(inputs=6, hidden=8, classes=3)


def test_fitted_on_the_first_steps_without_a_warning_and_training_unchanged(tmp_path: Path) -> None:
    recorded, plain = _model(), _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-projection advice: the bases are fitted
        _train(recorded, tmp_path / "log", proj_dim=(2, 3), calibration_steps=3)
    _train(plain, None)
    for ours, theirs in zip(recorded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(ours, theirs)  # holding steps changes nothing in the training
    log = dvemb.open_log(tmp_path / "log")
    assert log.complete and log.num_steps == 5
    calibration = log.manifest["projection"]["calibration"]
    assert calibration["source"] == "first steps" and calibration["steps"] == 3 and calibration["examples"] == 12
    assert {entry["basis"] for entry in log.manifest["layers"]} == {"calibrated"}


def test_held_and_later_rows_are_the_unprojected_rows_in_the_fitted_bases(tmp_path: Path) -> None:
    """Every step (held or not), gradients and Gauss-Newton rows, query gradients: the unprojected log's rows
    projected with the fitted bases; and the bases are the top eigenvectors of the first steps' GGN factors."""
    _train(_model(), tmp_path / "auto", proj_dim=(2, 3), calibration_steps=3)
    _train(_model(), tmp_path / "whole", proj_dim=None)
    auto, whole = dvemb.open_log(tmp_path / "auto"), dvemb.open_log(tmp_path / "whole")
    shard, full = next(auto.iter_shards()), next(whole.iter_shards())
    queries, full_queries = auto.load_query_set("q"), whole.load_query_set("q")
    for layer in auto.layers:
        p = layer.projection
        out_dim, in_dim = p.out_dim, p.in_dim

        def project(rows: torch.Tensor) -> torch.Tensor:
            return p.project_matrix(rows.reshape(*rows.shape[:-1], out_dim, in_dim))  # noqa: B023

        for ours, theirs in (
            (shard.grads[layer.name], project(full.grads[layer.name])),
            (shard.curvature[layer.name], project(full.curvature[layer.name])),
            (queries.grads[layer.name], project(full_queries.grads[layer.name])),
        ):
            assert (ours - theirs).abs().max() < 1e-12 * theirs.abs().max(), layer.name
        # the bases: top eigenvectors of sum G G^T and sum G^T G over the first 3 steps' GGN rows (12 examples)
        rows = full.curvature[layer.name][:12].reshape(-1, out_dim, in_dim)  # (12 * R, out, in)
        out_cov = torch.einsum("noi,npi->op", rows, rows)
        in_cov = torch.einsum("noi,nop->ip", rows, rows)
        for basis, cov, k in ((p.basis_out, out_cov, p.k_out), (p.basis_in, in_cov, p.k_in)):
            if basis is None:
                assert k == cov.shape[0]  # a side kept whole
                continue
            expected = top_eigenvectors(cov, k)
            assert (basis @ basis.T - expected @ expected.T).abs().max() < 1e-8, layer.name


def test_a_run_shorter_than_the_held_steps_is_fitted_at_close(tmp_path: Path) -> None:
    _train(_model(), tmp_path / "log", steps=2, proj_dim=(2, 3))  # default: 16 steps held at most
    log = dvemb.open_log(tmp_path / "log")
    assert log.num_steps == 2 and log.manifest["projection"]["calibration"]["steps"] == 2


def _train_lm(log_dir: Path, steps: int = 5, **options: object) -> nn.Module:
    """A tied LM (embedding = LM head) trained by AdamW on token batches with padding, recorded."""
    torch.manual_seed(0)
    model = TiedLM().double()
    generator = torch.Generator().manual_seed(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = dvemb.Recorder(model, log_dir, dtype="float64", layers="all", **options)  # type: ignore[arg-type]
    batches = [torch.randint(0, 9, (4, 5), generator=generator) for _ in range(steps)]
    for step, tokens in enumerate(batches):
        with rec.step(list(range(4 * step, 4 * step + 4)), optimizer):
            F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("q", [(batches[0][:2, :-1], batches[0][:2, 1:])])
    rec.close()
    return model


@pytest.mark.parametrize("proj_dim", [(3, 2), 16])
def test_a_tied_embedding_and_lm_head_share_one_basis_fitted_on_both_paths(tmp_path: Path, proj_dim: object) -> None:
    """GPT-2's tied embedding / LM head: one basis fitted on the first steps from the embedding's token factors
    and the head's output gradients together; every held and later row (both paths summed) and the queries are
    the unprojected log's rows projected with it. With an int proj_dim (a budget) the fitted split of each
    layer's sizes is the one the log holds."""
    _train_lm(tmp_path / "auto", proj_dim=proj_dim, calibration_steps=3, curvature_samples=2)
    _train_lm(tmp_path / "whole", proj_dim=None, curvature_samples=2)
    auto, whole = dvemb.open_log(tmp_path / "auto"), dvemb.open_log(tmp_path / "whole")
    entry = next(e for e in auto.manifest["layers"] if e["name"] == "embed")
    assert entry["tied"] == ["head"] and entry["basis"] == "calibrated"
    tied = next(layer for layer in auto.layers if layer.name == "embed")
    assert tied.projection.basis_out is not None or tied.projection.basis_in is not None
    if proj_dim == 16:
        assert all(layer.projection.dim <= 16 for layer in auto.layers)
    shard, full = next(auto.iter_shards()), next(whole.iter_shards())
    queries, full_queries = auto.load_query_set("q"), whole.load_query_set("q")
    for layer in auto.layers:
        p = layer.projection

        def project(rows: torch.Tensor) -> torch.Tensor:
            return p.project_matrix(rows.reshape(*rows.shape[:-1], p.out_dim, p.in_dim))  # noqa: B023

        for ours, theirs in (
            (shard.grads[layer.name], project(full.grads[layer.name])),
            (shard.curvature[layer.name], project(full.curvature[layer.name])),
            (queries.grads[layer.name], project(full_queries.grads[layer.name])),
        ):
            assert (ours - theirs).abs().max() < 1e-12 * theirs.abs().max(), layer.name
