"""The approximations a computation's summary lists (dvemb.engine.approximations), from manifests built by hand,
and through a real computation into summary.json and the typed Summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb.engine import ComputeArguments, compute
from dvemb.engine.approximations import KINDS, approximations, tracked_share
from dvemb.formats import Approximation, Summary, SummaryError


def _layer(
    out_dim: int = 8, in_dim: int = 8, k_out: int = 8, k_in: int = 8, basis: str | None = None
) -> dict[str, Any]:
    layer: dict[str, Any] = {"name": "l", "kind": "linear", "out_dim": out_dim, "in_dim": in_dim}
    layer |= {"k_out": k_out, "k_in": k_in, "seed_out": 1, "seed_in": 2}
    if basis is not None:
        layer["basis"] = basis
    return layer


def _manifest(*layers: dict[str, Any], **fields: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "curvature": {"mode": "ggn", "samples": None, "rows_per_example": 10},
        "layers": list(layers) or [_layer()],
        "tracked_parameters": 90,
        "total_parameters": 100,
    }
    return manifest | fields


def _kinds(manifest: dict[str, Any], **settings: Any) -> list[str]:
    chosen = {"curvature": "ggn", "propagation": "sgd", "blocks": "full"} | settings
    return [a.kind for a in approximations(manifest, **chosen)]


def _one(manifest: dict[str, Any], kind: str, **settings: Any) -> Approximation:
    chosen = {"curvature": "ggn", "propagation": "sgd", "blocks": "full"} | settings
    found = [a for a in approximations(manifest, **chosen) if a.kind == kind]
    assert len(found) == 1, found
    return found[0]


def test_exact_settings_list_nothing() -> None:
    assert _kinds(_manifest(_layer(), _layer())) == []


def test_empirical_curvature_is_listed_with_the_fix_the_log_allows() -> None:
    ggn_log = _one(_manifest(), "curvature-empirical", curvature="empirical")
    assert "compute with curvature='ggn'" in ggn_log.detail and "Recorder(" not in ggn_log.detail
    empirical_log = _manifest(curvature={"mode": "empirical", "samples": None, "rows_per_example": None})
    assert "Recorder(curvature='ggn')" in _one(empirical_log, "curvature-empirical", curvature="empirical").detail
    assert _kinds(_manifest(), curvature="ggn") == []


@pytest.mark.parametrize(
    ("curvature", "expected"),
    [
        ({"mode": "ggn", "samples": 4, "rows_per_example": 4}, 4),  # asked for samples
        ({"mode": "ggn", "samples": None, "rows_per_example": 1}, 1),  # the recorder's fallback: many classes
        ({"mode": "ggn", "samples": None, "rows_per_example": 1, "source": "output", "loss": "cross_entropy"}, 1),
        ({"mode": "ggn", "samples": None, "rows_per_example": 1, "source": "manual"}, 1),  # rec.curvature(logits)
        ({"mode": "ggn", "samples": None, "rows_per_example": 10}, None),  # all ten classes
        ({"mode": "ggn", "samples": 3, "rows_per_example": 3, "loss": "mse"}, 3),  # random directions
        ({"mode": "ggn", "samples": None, "rows_per_example": 1, "loss": "mse"}, None),  # maybe one output: exact
        ({"mode": "ggn", "samples": None, "rows_per_example": None}, None),  # no step recorded
        ({"mode": "ggn"}, None),  # an older log
        # As many rows asked as there are classes or more: capped at the classes, every class's row (exact).
        ({"mode": "ggn", "samples": 50, "rows_per_example": 5, "estimator": "top-classes+label"}, None),
    ],
)
def test_sampled_curvature_labels_are_listed_with_their_count(curvature: dict[str, Any], expected: int | None) -> None:
    manifest = _manifest(curvature=curvature)
    if expected is None:
        assert "curvature-sampled" not in _kinds(manifest)
        return
    found = _one(manifest, "curvature-sampled")
    what = "random direction" if curvature.get("loss") == "mse" else "label"
    assert f"{expected} sampled {what}" in found.label and f"uses {expected} {what}" in found.detail
    assert "curvature-sampled" not in _kinds(manifest, curvature="empirical")  # the factors are not used


def test_random_projection_counts_the_randomly_projected_layers() -> None:
    layers = [
        _layer(k_out=4),  # seeded by default (an older log has no basis), projected
        _layer(k_in=2, basis="seeded"),
        _layer(k_out=4, k_in=4, basis="calibrated"),
        _layer(basis="seeded"),  # stored whole: nothing random about it
    ]
    found = _one(_manifest(*layers), "random-projection")
    assert found.detail.startswith("2 of 4 tracked layers") and "rec.calibrate(" in found.detail
    assert "calibration_steps" in found.detail
    assert "random-projection" not in _kinds(_manifest(layers[2], layers[3]))
    # a fitted layer whose vocabulary side is too large to fit keeps a random basis there
    vocabulary = _layer(out_dim=50257, k_out=16, k_in=4, basis="calibrated")
    assert _one(_manifest(vocabulary, layers[2]), "random-projection").detail.startswith("1 of 2 tracked layers")


@pytest.mark.parametrize(
    ("tracked", "total", "share", "listed"),
    [(23, 1000, 0.023, "2.3%"), (79, 100, 0.79, "79%"), (80, 100, 0.8, None), (5, 0, None, None)],
)
def test_untracked_parameters_below_80_percent(
    tracked: int, total: int, share: float | None, listed: str | None
) -> None:
    manifest = _manifest(tracked_parameters=tracked, total_parameters=total)
    assert tracked_share(manifest) == share
    if listed is None:
        assert "untracked-parameters" not in _kinds(manifest)
    else:
        assert _one(manifest, "untracked-parameters").detail.startswith(f"{listed} of trainable parameters are tracked")
    older = {k: v for k, v in manifest.items() if k != "total_parameters"}
    assert tracked_share(older) is None and "untracked-parameters" not in _kinds(older)


def test_adam_second_moment_is_dropped_in_projected_layers_or_everywhere_when_asked() -> None:
    whole, projected, calibrated = _layer(), _layer(k_out=4), _layer(basis="calibrated")
    mixed = _manifest(whole, projected, calibrated)
    found = _one(mixed, "second-moment-dropped", propagation="adamw")
    assert "2 projected layer(s) of 3" in found.detail  # a calibrated basis rotates the layer: not stored whole
    assert "second-moment-dropped" not in _kinds(_manifest(whole, whole), propagation="adam")
    off = _one(_manifest(whole), "second-moment-dropped", propagation="adam", second_moment=False)
    assert off.detail.startswith("second_moment=False was asked for")
    for propagation in ("sgd", "momentum", "proxy"):  # no second moment to model
        assert "second-moment-dropped" not in _kinds(mixed, propagation=propagation, second_moment=False)


def test_adam_second_moment_in_projected_layers_only_when_lifted_and_carried() -> None:
    """A projected layer whose log keeps both moments whole ("lifted-moments") carries the term when the computation
    lifts it; not otherwise, nor through singular pairs (a weak carrier, no longer used)."""
    carried = _layer(k_out=4) | {"second_moment": "lifted-moments"}
    manifest = _manifest(_layer(), carried, optimizer={"type": "Adam", "second_moment_rank": 0})
    assert "second-moment-dropped" not in _kinds(manifest, propagation="adam")  # lifted (the function's default)
    assert "second-moment-dropped" in _kinds(manifest, propagation="adam", lifted=False)
    factors = _manifest(
        _layer(k_out=4) | {"second_moment": "factors"}, optimizer={"type": "Adam", "second_moment_rank": 4}
    )
    assert "second-moment-dropped" in _kinds(factors, propagation="adam")


def test_sgd_proxy_carries_the_reason() -> None:
    note = "Lion was used and influence follows the SGD proxy because Lion is not modelled: scores are approximate"
    found = _one(_manifest(), "sgd-proxy", propagation="proxy", proxy_note=note)
    assert found.detail.startswith(note) and "propagation='auto'" in found.detail
    assert "sgd-proxy" not in _kinds(_manifest(), propagation="sgd")


def test_per_layer_blocks_only_with_several_layers() -> None:
    assert "per-layer-blocks" in _kinds(_manifest(_layer(), _layer()), blocks="layer")
    assert "per-layer-blocks" not in _kinds(_manifest(_layer()), blocks="layer")  # one block is the full M
    assert "per-layer-blocks" not in _kinds(_manifest(_layer(), _layer()), blocks="full")


def test_everything_at_once_in_the_documented_order() -> None:
    manifest = _manifest(
        _layer(), _layer(k_out=4), curvature={"mode": "ggn", "samples": 2}, tracked_parameters=1, total_parameters=100
    )
    found = approximations(manifest, curvature="empirical", propagation="proxy", blocks="layer")
    unlisted = ("curvature-sampled", "second-moment-dropped")
    assert [a.kind for a in found] == [k for k in KINDS if k not in unlisted]
    found = approximations(manifest, curvature="ggn", propagation="adam", blocks="layer", second_moment=False)
    unlisted = ("sgd-proxy", "curvature-empirical")
    assert [a.kind for a in found] == [k for k in KINDS if k not in unlisted]
    assert all(a.label and a.detail.endswith(".") for a in found)


def test_an_empty_or_odd_manifest_lists_only_what_the_settings_say() -> None:
    assert _kinds({}, curvature="empirical", blocks="layer") == ["curvature-empirical"]
    odd = {"layers": [None, {"k_out": "4", "out_dim": 8}], "curvature": None, "tracked_parameters": True}
    assert _kinds(odd) == []


def _record(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, proj_dim=(2, 3), projection="random", curvature="empirical")
    for step in range(3):
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        with rec.step([4 * step + i for i in range(4)], optimizer):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(x[:2], y[:2])])
    rec.close()


def test_the_summary_lists_them_and_the_typed_summary_reads_them(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    manifest = json.loads((tmp_path / "log" / "manifest.json").read_text())
    summary = compute(tmp_path / "log", tmp_path / "out", ComputeArguments(blocks="layer"))
    assert [a["kind"] for a in summary["approximations"]] == [
        "curvature-empirical",
        "random-projection",
        "per-layer-blocks",
    ]
    assert summary["tracked_share"] == manifest["tracked_parameters"] / manifest["total_parameters"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    typed = Summary.from_json(written)
    assert [a.to_json() for a in typed.approximations] == summary["approximations"]
    older = {k: v for k, v in written.items() if k != "approximations"}
    assert typed.approximations_known and typed.approximations_json() == summary["approximations"]
    before = Summary.from_json(older)  # a summary written before the field existed: none listed, and unknown
    assert before.approximations == () and not before.approximations_known and before.approximations_json() is None
    with pytest.raises(SummaryError, match="needs string kind, label and detail"):
        Summary.from_json({**written, "approximations": [{"kind": "x"}]})
