"""The engine against explicit products and the naive recursion, resuming, aggregates and errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp
from reference import batch_removed
from safetensors.torch import load_file

import dvemb
from dvemb.engine import ComputeArguments, ComputeProgress, compute, find_phases, load_results, reference_embeddings
from dvemb.engine.compute import AUTO_FULL_MAX_DIM, resolve_blocks

STEPS_PER_EPOCH = 4


def _record(
    log_dir: Path,
    *,
    reduction: str = "mean",
    weight_decay: float = 0.0,
    curvature: str = "ggn",
    epochs: int = 2,
    layer_lrs: bool = False,
) -> None:
    """Two epochs of 4 steps over 16 examples (batch 4), shards of 3 steps, float64, no projection."""
    model = mlp(inputs=5, hidden=4, classes=3)
    if layer_lrs:
        groups = [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters()}]
        optimizer = torch.optim.SGD(groups, lr=0.3, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    rec = dvemb.Recorder(
        model, log_dir, proj_dim=None, dtype="float64", shard_steps=3, curvature=curvature, loss_reduction=reduction
    )
    for _ in range(epochs):
        order = torch.randperm(16)
        for b in range(STEPS_PER_EPOCH):
            ids = order[4 * b : 4 * b + 4]
            with rec.step(ids, optimizer):
                logits = model(x[ids])
                if curvature == "ggn":
                    rec.curvature(logits)
                F.cross_entropy(logits, y[ids], reduction=reduction).backward()
                optimizer.step()
                optimizer.zero_grad()
            scheduler.step()
    rec.record_queries("val", [(torch.randn(6, 5), torch.randint(0, 3, (6,)))])
    rec.record_queries("other", [(torch.randn(2, 5), torch.randint(0, 3, (2,)))])
    rec.close()


def _log_arrays(log_dir: Path) -> dict[str, torch.Tensor]:
    log = dvemb.open_log(log_dir)
    shards = list(log.iter_shards())
    cat = torch.cat
    out = {
        "grads": cat([cat([s.grads[layer.name] for layer in log.layers], 1) for s in shards]),
        "row_step": cat([s.row_step for s in shards]),
        "lr": cat([s.lr for s in shards]),
        "wd": cat([s.weight_decay for s in shards]),
        "batch": cat([s.batch_size for s in shards]),
    }
    if log.curvature_mode == "ggn":
        out["curv"] = cat([cat([s.curvature[layer.name] for layer in log.layers], 2) for s in shards])
    out["offsets"] = torch.tensor(np.cumsum([0] + [layer.dim for layer in log.layers]))
    return out


def _blocks(a: dict[str, torch.Tensor], blocks: str) -> list[tuple[int, int, int]]:
    """(first column, last column, layer) of each M block."""
    offsets = a["offsets"].tolist()
    if blocks == "full":
        return [(0, offsets[-1], 0)]
    return [(offsets[i], offsets[i + 1], i) for i in range(len(offsets) - 1)]


def _rate(a: dict[str, torch.Tensor], t: int, layer: int, reduction: str) -> tuple[float, float]:
    lr = float(a["lr"][t, layer])
    rate = lr / float(a["batch"][t]) if reduction == "mean" else lr
    return rate, 1.0 - lr * float(a["wd"][t, layer])


def _explicit(a: dict[str, torch.Tensor], mode: str, blocks: str, reduction: str) -> torch.Tensor:
    """r_s (c_{T-1} I - r_{T-1} H_{T-1}) ... (c_{s+1} I - r_{s+1} H_{s+1}) g_s, with matrices built explicitly."""
    steps = int(a["row_step"].max()) + 1
    out = torch.zeros_like(a["grads"])
    for lo, hi, layer in _blocks(a, blocks):
        eye = torch.eye(hi - lo)
        hessians = []
        for t in range(steps):
            rows = a["row_step"] == t
            h = a["grads"][rows, lo:hi] if mode == "empirical" else a["curv"][rows][:, :, lo:hi].flatten(0, 1)
            hessians.append(h.T @ h)  # GGN built from its factors (or the empirical Fisher)
        for t in range(steps):
            product = eye.clone()
            for k in range(steps - 1, t, -1):
                rate, decay = _rate(a, k, layer, reduction)
                product = product @ (decay * eye - rate * hessians[k])
            rows = a["row_step"] == t
            out[rows, lo:hi] = (
                _rate(a, t, layer, reduction)[0] * _removed(a["grads"][rows, lo:hi], reduction) @ product.T
            )
    return out


def _removed(grads: torch.Tensor, reduction: str) -> torch.Tensor:
    """A step's (B, d) rows as the gradient changes the engine's default removal gives them."""
    return batch_removed(grads) if reduction == "mean" else grads


def _naive(a: dict[str, torch.Tensor], mode: str, blocks: str, reduction: str) -> torch.Tensor:
    steps = int(a["row_step"].max()) + 1
    out = torch.zeros_like(a["grads"])
    for lo, hi, layer in _blocks(a, blocks):
        g = [a["grads"][a["row_step"] == t, lo:hi] for t in range(steps)]
        c = (
            None
            if mode == "empirical"
            else [a["curv"][a["row_step"] == t][:, :, lo:hi].flatten(0, 1) for t in range(steps)]
        )
        rates = [_rate(a, t, layer, reduction) for t in range(steps)]
        removed = [_removed(rows, reduction) for rows in g]
        embeddings = reference_embeddings(
            removed, c if c is not None else g, [r for r, _ in rates], [d for _, d in rates]
        )
        for t in range(steps):
            out[a["row_step"] == t, lo:hi] = embeddings[t]
    return out


def _relative_error(got: np.ndarray, expected: torch.Tensor) -> float:
    return float((torch.from_numpy(got) - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["empirical", "ggn"])
def test_full_m_equals_the_explicit_product(tmp_path: Path, reduction: str, weight_decay: float, mode: str) -> None:
    _record(tmp_path / "log", reduction=reduction, weight_decay=weight_decay)
    compute(
        tmp_path / "log", tmp_path / "out", ComputeArguments(curvature=mode, blocks="full", accumulate_dtype="float64")
    )
    expected = _explicit(_log_arrays(tmp_path / "log"), mode, "full", reduction)
    assert _relative_error(np.load(tmp_path / "out" / "embeddings.npy"), expected) < 1e-10


@pytest.mark.parametrize("mode", ["empirical", "ggn"])
@pytest.mark.parametrize("blocks", ["layer", "full"])
@pytest.mark.parametrize("block_rows", [1, 7, None])
def test_streaming_equals_the_naive_recursion(tmp_path: Path, mode: str, blocks: str, block_rows: int | None) -> None:
    _record(tmp_path / "log", weight_decay=0.02, layer_lrs=blocks == "layer")
    args = ComputeArguments(curvature=mode, blocks=blocks, accumulate_dtype="float64", block_rows=block_rows)
    compute(tmp_path / "log", tmp_path / "out", args)
    expected = _naive(_log_arrays(tmp_path / "log"), mode, blocks, "mean")
    assert _relative_error(np.load(tmp_path / "out" / "embeddings.npy"), expected) < 1e-10
    if blocks == "layer":
        assert (
            _relative_error(
                np.load(tmp_path / "out" / "embeddings.npy"),
                _explicit(_log_arrays(tmp_path / "log"), mode, "layer", "mean"),
            )
            < 1e-10
        )


@pytest.mark.parametrize("layer_lrs", [False, True])
def test_auto_blocks_choose_full_m_for_one_optimizer_setting(tmp_path: Path, layer_lrs: bool) -> None:
    """A small log trained in one optimizer setting gets the full M (cross-layer curvature kept); layers
    with learning rates of their own get per-layer blocks. Either way the result equals the explicit choice."""
    _record(tmp_path / "log", layer_lrs=layer_lrs)
    auto = compute(tmp_path / "log", tmp_path / "auto", ComputeArguments(accumulate_dtype="float64"))
    expected_blocks = "layer" if layer_lrs else "full"
    assert auto["blocks"] == expected_blocks and auto["arguments"]["blocks"] == "auto"
    explicit = ComputeArguments(blocks=expected_blocks, accumulate_dtype="float64")
    compute(tmp_path / "log", tmp_path / "explicit", explicit)
    np.testing.assert_array_equal(
        np.load(tmp_path / "auto" / "embeddings.npy"), np.load(tmp_path / "explicit" / "embeddings.npy")
    )


def test_auto_blocks_fall_back_to_layers_above_the_size_limit() -> None:
    # Logs whose typed manifest (GradientLog.info) holds only the optimizer entry; the last one records none.
    one_group = SimpleNamespace(info=SimpleNamespace(optimizer={"param_groups": [{"lr": 0.1}], "layer_groups": [0, 0]}))
    two_groups = SimpleNamespace(
        info=SimpleNamespace(optimizer={"param_groups": [{"lr": 0.1}, {"lr": 0.2}], "layer_groups": [0, 1]})
    )
    unused_group = SimpleNamespace(
        info=SimpleNamespace(optimizer={"param_groups": [{"lr": 0.1}, {"lr": 0.2}], "layer_groups": [1, 1]})
    )
    hand_written = SimpleNamespace(info=SimpleNamespace(optimizer={}))
    assert resolve_blocks("auto", one_group, AUTO_FULL_MAX_DIM) == "full"  # type: ignore[arg-type]
    assert resolve_blocks("auto", one_group, AUTO_FULL_MAX_DIM + 1) == "layer"  # type: ignore[arg-type]
    assert resolve_blocks("auto", two_groups, 64) == "layer"  # type: ignore[arg-type]
    assert resolve_blocks("auto", unused_group, 64) == "full"  # type: ignore[arg-type]
    assert resolve_blocks("auto", hand_written, 64) == "full"  # type: ignore[arg-type]
    assert resolve_blocks("layer", one_group, 64) == "layer"  # type: ignore[arg-type]


def test_float32_accumulation_is_close(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    compute(tmp_path / "log", tmp_path / "out", ComputeArguments(blocks="full"))
    expected = _naive(_log_arrays(tmp_path / "log"), "ggn", "full", "mean")
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    assert embeddings.dtype == np.float32
    assert _relative_error(embeddings.astype(np.float64), expected) < 1e-5


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    args = ComputeArguments(accumulate_dtype="float64")
    compute(tmp_path / "log", tmp_path / "whole", args)

    class StopError(Exception):
        pass

    def stop_after_one_shard(p: ComputeProgress) -> None:
        if p.steps_done >= 2:
            raise StopError

    with pytest.raises(StopError):
        compute(tmp_path / "log", tmp_path / "resumed", args, progress=stop_after_one_shard)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    seen: list[int] = []
    compute(tmp_path / "log", tmp_path / "resumed", args, progress=lambda p: seen.append(p.steps_done))
    assert seen[0] > 2  # continued, not restarted
    for name in ["embeddings.npy", "scores-val.npy", "totals-val.npy", "curves-val.npy"]:
        assert np.array_equal(np.load(tmp_path / "whole" / name), np.load(tmp_path / "resumed" / name)), name
    for name in ["topk-val.safetensors", "curve-val.safetensors", "occurrences.safetensors"]:
        whole, resumed = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "resumed" / name))
        assert all(
            torch.allclose(whole[k].double(), resumed[k].double(), rtol=0, atol=0, equal_nan=True) for k in whole
        ), name
    assert not (tmp_path / "resumed" / "checkpoint.safetensors").exists()


def test_scores_topk_totals_and_curves_agree(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    summary = compute(tmp_path / "log", tmp_path / "out", ComputeArguments(top_k=5, accumulate_dtype="float64"))
    out = tmp_path / "out"
    embeddings = torch.from_numpy(np.load(out / "embeddings.npy"))
    log = dvemb.open_log(tmp_path / "log")
    queries = log.load_query_set("val")
    q = torch.cat([queries.grads[layer.name] for layer in log.layers], 1)
    scores = embeddings @ q.T  # (R, Q): positive = helped
    assert torch.allclose(torch.from_numpy(np.load(out / "scores-val.npy")), scores, rtol=1e-12, atol=1e-15)
    occ = load_file(str(out / "occurrences.safetensors"))
    assert occ["epoch"].tolist() == [0] * 16 + [1] * 16  # every example seen once per epoch
    top = load_file(str(out / "topk-val.safetensors"))
    for query in range(q.shape[0]):
        helpful = top["score"][(top["query"] == query) & (top["kind"] == 0)]
        assert torch.allclose(helpful, scores[:, query].topk(5).values)
    set_harmful = top["row"][(top["query"] == -1) & (top["kind"] == 1)]
    assert set_harmful.tolist() == scores.mean(1).topk(5, largest=False).indices.tolist()
    totals = np.load(out / "totals-val.npy")
    examples = load_file(str(out / "examples.safetensors"))["example_id"].tolist()
    example = examples[3]
    rows = [i for i, e in enumerate(occ["example_index"].tolist()) if e == 3]
    assert np.allclose(totals[3], scores[rows].sum(0).numpy())
    assert len(rows) == 2 and example in examples
    # The curves are those of each step's data as a whole: the mean of the "weight" removal's scores (the
    # default "batch" removal's step means are 0 by construction).
    compute(tmp_path / "log", tmp_path / "weight", ComputeArguments(accumulate_dtype="float64", removal="weight"))
    weight_scores = torch.from_numpy(np.load(tmp_path / "weight" / "scores-val.npy"))
    curve = load_file(str(out / "curve-val.safetensors"))
    step_mean = torch.stack([weight_scores[occ["row_step"] == t].mean() for t in range(8)])
    assert torch.allclose(curve["mean"], step_mean) and bool(step_mean.abs().max() > 0)
    assert torch.allclose(curve["mean_per_lr"], step_mean / curve["lr"])
    assert summary["query_sets"]["other"]["num_queries"] == 2 and summary["sgd_proxy"] is False
    assert summary["removal"] == "batch"  # a mean-reduced log


def test_batch_removal_is_the_weight_removal_centred_per_step(tmp_path: Path) -> None:
    """removal='batch' (the default for a mean-reduced loss) equals, per step, B/(B-1) (s_z - mean s) of the
    removal='weight' scores and embeddings, computed naively; a summed loss keeps the weight removal."""
    _record(tmp_path / "log")
    weight, batch = tmp_path / "weight", tmp_path / "batch"
    compute(tmp_path / "log", weight, ComputeArguments(accumulate_dtype="float64", removal="weight", block_rows=5))
    compute(tmp_path / "log", batch, ComputeArguments(accumulate_dtype="float64", removal="batch", block_rows=5))
    steps = load_file(str(weight / "occurrences.safetensors"))["row_step"]
    for name in ("scores-val.npy", "embeddings.npy"):
        expected = torch.from_numpy(np.load(weight / name)).clone()
        for t in steps.unique():
            rows = steps == t
            expected[rows] = batch_removed(expected[rows])
        got = torch.from_numpy(np.load(batch / name))
        assert _relative_error(got.numpy(), expected) < 1e-12, name
    totals = np.load(batch / "totals-val.npy")
    assert not np.allclose(totals, np.load(weight / "totals-val.npy"))
    _record(tmp_path / "sum", reduction="sum")
    assert compute(tmp_path / "sum", tmp_path / "sum-out", ComputeArguments())["removal"] == "weight"


def test_phases_are_found_from_the_data() -> None:
    steps = 300
    per_lr = np.concatenate([np.full(30, 50.0), np.full(200, 1.0), np.full(70, 8.0)])
    per_lr *= 1 + 0.1 * np.random.default_rng(0).standard_normal(steps)
    lr = np.full(steps, 0.1)
    phases = find_phases(per_lr, np.abs(per_lr) * lr, lr)
    assert abs(phases.boundaries[0] - 30) <= 6 and abs(phases.boundaries[1] - 230) <= 6
    assert phases.ranges["basin"] == [phases.boundaries[0], phases.boundaries[1] - 1]
    assert sum(phases.share_abs.values()) == pytest.approx(1.0)
    assert phases.share_abs["early"] > phases.share_abs["late"] > 0.2


def test_identical_computation_is_not_repeated_and_others_are_not_clobbered(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    first = compute(tmp_path / "log", tmp_path / "out")
    calls: list[ComputeProgress] = []
    again = compute(tmp_path / "log", tmp_path / "out", progress=calls.append)
    assert again == json.loads((tmp_path / "out" / "summary.json").read_text()) == first
    assert not calls
    with pytest.raises(dvemb.ConfigError, match="another computation"):
        compute(tmp_path / "log", tmp_path / "out", ComputeArguments(curvature="empirical"))
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == first


def test_engine_errors(tmp_path: Path) -> None:
    _record(tmp_path / "emp", curvature="empirical")
    with pytest.raises(dvemb.ConfigError, match="needs a log recorded with curvature='ggn'"):
        compute(tmp_path / "emp", tmp_path / "o1", ComputeArguments(curvature="ggn"))
    _record(tmp_path / "lrs", layer_lrs=True)
    with pytest.raises(dvemb.ConfigError, match="use blocks='layer'"):
        compute(tmp_path / "lrs", tmp_path / "o2", ComputeArguments(blocks="full"))
    with pytest.raises(dvemb.ConfigError, match="not in the log"):
        compute(tmp_path / "lrs", tmp_path / "o3", ComputeArguments(query_sets=("nope",)))
    with pytest.raises(dvemb.ConfigError, match="blocks='rows'"):
        ComputeArguments(blocks="rows")
    with pytest.raises(dvemb.ConfigError, match="second_moment_lifted='on' is not one of None, True, False"):
        ComputeArguments(second_moment_lifted="on")  # type: ignore[arg-type]


@pytest.mark.parametrize("queries", [False, True], ids=["embeddings-checked", "scores-checked"])
def test_divergent_learning_rate_stops_with_the_step(tmp_path: Path, queries: bool) -> None:
    """Without query sets the embeddings are checked; with them, the scores (every score of a non-finite embedding
    is non-finite): either way the computation stops naming the steps."""
    model = mlp()
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None, loss_reduction="sum")
    x = torch.randn(8, 6) * 30
    for step in range(40):
        with rec.step([step], lr=1e6):  # recorded rate far beyond the curvature's stability limit
            F.cross_entropy(model(x[step % 8 : step % 8 + 1]), torch.tensor([step % 3]), reduction="sum").backward()
    if queries:
        rec.record_queries("val", [(x[:4], torch.tensor([0, 1, 2, 0]))])
    rec.close()
    with pytest.raises(dvemb.NumericalError, match="non-finite embedding at steps"):
        compute(tmp_path / "log", tmp_path / "out", ComputeArguments(save_embeddings=False))


def test_results_reader(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    compute(tmp_path / "log", tmp_path / "out", ComputeArguments(top_k=4))
    results = load_results(tmp_path / "out")
    scores = np.load(tmp_path / "out" / "scores-val.npy")
    harmful = results.top("val", kind="harmful", k=3)
    assert [r["row"] for r in harmful] == np.argsort(scores.mean(1))[:3].tolist()
    assert harmful[0]["example_id"] == results.example_ids[int(results.example_index[harmful[0]["row"]])]
    helpful_q1 = results.top("val", query=1, k=4)
    assert [r["score"] for r in helpful_q1] == pytest.approx(sorted(scores[:, 1], reverse=True)[:4])
    history = results.history(harmful[0]["example_id"], "val")
    assert [h["epoch"] for h in history] == [0, 1]
    assert harmful[0]["row"] in [h["row"] for h in history]
    assert results.curve("val")["mean"].shape == (8,)
    with pytest.raises(dvemb.ConfigError, match="no results for query set"):
        results.top("nope")
    with pytest.raises(dvemb.ConfigError, match="does not occur"):
        results.history(12345, "val")


def test_self_influence_on_request(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    compute(tmp_path / "log", tmp_path / "out", ComputeArguments(self_influence=True, accumulate_dtype="float64"))
    a = _log_arrays(tmp_path / "log")
    embeddings = torch.from_numpy(np.load(tmp_path / "out" / "embeddings.npy"))
    expected = (embeddings * a["grads"]).sum(1)
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "out" / "self_influence.npy")), expected, rtol=1e-12)
    compute(tmp_path / "log", tmp_path / "plain")
    assert not (tmp_path / "plain" / "self_influence.npy").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(tmp_path: Path) -> None:
    _record(tmp_path / "log")
    for device in ("cpu", "cuda"):
        compute(tmp_path / "log", tmp_path / device, ComputeArguments(device=device, accumulate_dtype="float64"))
    cpu, cuda = (np.load(tmp_path / d / "embeddings.npy") for d in ("cpu", "cuda"))
    assert np.abs(cpu - cuda).max() <= 1e-10 * np.abs(cpu).max()


def test_phases_ignore_a_lone_spike() -> None:
    """A single spike must not become a one-step phase: every phase spans at least 5% of the curve."""
    per_lr = np.concatenate([np.full(100, 20.0), np.full(200, 1.0)])
    per_lr[-1] = 1e4  # without the minimum length the fit makes the last 3 steps a "late phase"
    lr = np.full(300, 0.1)
    phases = find_phases(per_lr, np.abs(per_lr) * lr, lr)
    lengths = [last - first + 1 for first, last in phases.ranges.values()]
    assert min(lengths) >= 15, phases.ranges
    assert abs(phases.boundaries[0] - 100) <= 5


def test_results_never_overwrite_the_log(tmp_path: Path) -> None:
    """`dvemb compute LOG --out LOG --overwrite` used to delete the gradient log (issue 13)."""
    _record(tmp_path / "log")
    before = sorted(p.name for p in (tmp_path / "log").iterdir())
    for out in (tmp_path / "log", tmp_path):
        with pytest.raises(dvemb.ConfigError, match="is \\(or holds\\) a gradient log"):
            compute(tmp_path / "log", out, ComputeArguments(), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == before
    dvemb.open_log(tmp_path / "log").validate()
    compute(tmp_path / "log", tmp_path / "log" / "results")  # a folder inside the log is fine


def test_crash_between_checkpoint_and_totals_is_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Totals are added in place: a crash after the checkpoint is saved but before its totals rows are applied
    must neither lose them nor add them twice on resume."""
    from dvemb.engine.compute import _Run

    _record(tmp_path / "log")
    args = ComputeArguments(accumulate_dtype="float64")
    compute(tmp_path / "log", tmp_path / "whole", args)
    calls = {"n": 0}
    original = _Run._apply_totals

    def crash_on_third(s: object, rows: torch.Tensor, values: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint (two query sets each), after the file was saved
            raise RuntimeError("killed")
        original(s, rows, values)  # type: ignore[arg-type]

    monkeypatch.setattr(_Run, "_apply_totals", staticmethod(crash_on_third))
    with pytest.raises(RuntimeError, match="killed"):
        compute(tmp_path / "log", tmp_path / "resumed", args)
    monkeypatch.setattr(_Run, "_apply_totals", staticmethod(original))
    compute(tmp_path / "log", tmp_path / "resumed", args)
    for name in ["totals-val.npy", "totals-other.npy", "scores-val.npy"]:
        assert np.array_equal(np.load(tmp_path / "whole" / name), np.load(tmp_path / "resumed" / name)), name
    assert not (tmp_path / "resumed" / "scratch").exists()
