"""Segmented computation (influence checkpointing) against the sequential engine, and value dynamics
against the naive recursion run to each checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp
from safetensors.torch import load_file

import dvemb
from dvemb.engine import ComputeArguments, compute, reference_embeddings
from dvemb.engine.segmented import combine_segments, prepare_segments, run_segment

EXAMPLES, BATCH, SHARD_STEPS = 16, 4, 3
RTOL, ATOL = 1e-10, 1e-12


def _record(
    log_dir: Path,
    *,
    optimizer: str = "sgd",
    curvature: str = "ggn",
    weight_decay: float = 0.01,
    epochs: int = 3,
    checkpoints: tuple[int, ...] = (),
    proj_dim: int | None = None,
) -> None:
    """``epochs`` epochs of 4 steps over 16 examples, shards of 3 steps, float64."""
    model = mlp(inputs=5, hidden=4, classes=3)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=weight_decay)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    x, y = torch.randn(EXAMPLES, 5), torch.randint(0, 3, (EXAMPLES,))
    queries = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    rec = dvemb.Recorder(
        model, log_dir, proj_dim=proj_dim, dtype="float64", shard_steps=SHARD_STEPS, curvature=curvature
    )
    step = 0
    for _ in range(epochs):
        order = torch.randperm(EXAMPLES)
        for b in range(EXAMPLES // BATCH):
            if step in checkpoints:
                rec.record_queries("val", queries, checkpoint=True)
            ids = order[BATCH * b : BATCH * b + BATCH]
            with rec.step(ids, opt):
                logits = model(x[ids])
                if curvature == "ggn":
                    rec.curvature(logits)
                F.cross_entropy(logits, y[ids]).backward()
                opt.step()
                opt.zero_grad()
            scheduler.step()
            step += 1
    rec.record_queries("val", queries)
    rec.record_queries("other", [(torch.randn(2, 5), torch.randint(0, 3, (2,)))])
    rec.close()


def _arrays(out: Path) -> dict[str, np.ndarray]:
    files = {
        "embeddings": "embeddings.npy",
        "scores": "scores-val.npy",
        "other": "scores-other.npy",
        "totals": "totals-val.npy",
        "curves": "curves-val.npy",
    }
    arrays = {key: np.load(out / name) for key, name in files.items() if (out / name).exists()}
    for key, value in load_file(str(out / "topk-val.safetensors")).items():
        arrays[f"topk.{key}"] = value.numpy()
    for key, value in load_file(str(out / "curve-val.safetensors")).items():
        arrays[f"curve.{key}"] = value.numpy()
    return arrays


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=key, rtol=RTOL, atol=ATOL)


CASES = [
    pytest.param("sgd", "ggn", "layer", id="sgd-ggn-layer"),
    pytest.param("sgd", "empirical", "full", id="sgd-empirical-full"),
    pytest.param("sgd", "ggn", "full", id="sgd-ggn-full"),
    pytest.param("momentum", "empirical", "layer", id="momentum-empirical-layer"),
    pytest.param("adamw", "ggn", "layer", id="adamw-ggn-layer"),
]


@pytest.mark.parametrize(("optimizer", "curvature", "blocks"), CASES)
def test_segmented_equals_sequential(tmp_path: Path, optimizer: str, curvature: str, blocks: str) -> None:
    """K = 1, 2 and 7 segments (7 puts boundaries inside shards and on their edges) give the sequential results."""
    log = tmp_path / "log"
    _record(log, optimizer=optimizer, curvature=curvature)
    base = ComputeArguments(accumulate_dtype="float64", blocks=blocks, block_rows=6)
    compute(log, tmp_path / "seq", base)
    expected = _arrays(tmp_path / "seq")
    for k in (2, 7):
        args = ComputeArguments(accumulate_dtype="float64", blocks=blocks, block_rows=6, segments=k)
        summary = compute(log, tmp_path / f"seg{k}", args)
        assert summary["segments"] == k
        assert not (tmp_path / f"seg{k}" / "segments").exists()  # scratch removed
        _assert_same(expected, _arrays(tmp_path / f"seg{k}"))


def test_segments_in_worker_processes_and_rerun_alone(tmp_path: Path) -> None:
    """Segments run in two processes give the same results; a segment whose file is lost reruns alone."""
    log = tmp_path / "log"
    _record(log, optimizer="momentum", curvature="ggn", epochs=2)
    compute(log, tmp_path / "seq", ComputeArguments(accumulate_dtype="float64"))
    args = ComputeArguments(accumulate_dtype="float64", segments=3)
    compute(log, tmp_path / "pool", args, workers=2)
    _assert_same(_arrays(tmp_path / "seq"), _arrays(tmp_path / "pool"))

    out = tmp_path / "staged"
    plan = prepare_segments(log, out, args, args.segments)
    files = [run_segment(log, out, args, plan, j) for j in range(plan.num_segments)]
    mtimes = [f.stat().st_mtime_ns for f in files]
    files[1].unlink()  # as if the task that ran segment 1 was killed before it finished
    assert prepare_segments(log, out, args, args.segments) == plan  # the plan and scratch are kept
    again = [run_segment(log, out, args, plan, j) for j in range(plan.num_segments)]
    assert [f.stat().st_mtime_ns for f in (again[0], again[2])] == [mtimes[0], mtimes[2]]
    combine_segments(log, out, args, plan)
    _assert_same(_arrays(tmp_path / "seq"), _arrays(out))


def test_combine_refuses_missing_segments(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _record(log, epochs=1)
    args = ComputeArguments(segments=2)
    plan = prepare_segments(log, tmp_path / "out", args, 2)
    run_segment(log, tmp_path / "out", args, plan, 0)
    with pytest.raises(dvemb.ConfigError, match=r"segments \[1\]"):
        combine_segments(log, tmp_path / "out", args, plan)


def _naive_dynamics(log_dir: Path, checkpoints: list[int], names: list[str]) -> np.ndarray:
    """(C, 10) mean over occurrences of each tenth of training before checkpoint c of q_c . emb_c,
    with emb_c the naive SGD recursion run over steps 0..c-1 only and q_c the set's mean query."""
    log = dvemb.open_log(log_dir)
    shards = list(log.iter_shards())
    grads = torch.cat([torch.cat([s.grads[layer.name] for layer in log.layers], 1) for s in shards])
    curv = torch.cat([torch.cat([s.curvature[layer.name] for layer in log.layers], 2) for s in shards])
    row_step = torch.cat([s.row_step for s in shards])
    lr = torch.cat([s.lr[:, 0] for s in shards])
    wd = torch.cat([s.weight_decay[:, 0] for s in shards])
    batch = torch.cat([s.batch_size for s in shards])
    total = log.num_steps
    out = np.full((len(checkpoints), 10), np.nan)
    for c, (step, name) in enumerate(zip(checkpoints, names, strict=True)):
        q = log.load_query_set(name)
        query = torch.cat([q.grads[layer.name] for layer in log.layers], 1).mean(0)
        per_step = [grads[row_step == t] for t in range(step)]
        curv_step = [curv[row_step == t].flatten(0, 1) for t in range(step)]
        rate = [float(lr[t] / batch[t]) for t in range(step)]
        decay = [float(1 - lr[t] * wd[t]) for t in range(step)]
        emb = reference_embeddings(per_step, curv_step, rate, decay)
        scores = torch.cat([e @ query for e in emb])
        bucket = (row_step[row_step < step] * 10) // total
        for b in range(10):
            if bool((bucket == b).any()):
                out[c, b] = float(scores[bucket == b].mean())
    return out


def test_value_dynamics_against_naive_recursion(tmp_path: Path) -> None:
    """Checkpoint query sets at steps 5 and 8 (and the final set at 12): every tenth of training's mean
    influence on each checkpoint equals the naive recursion run to that checkpoint."""
    log = tmp_path / "log"
    _record(log, checkpoints=(5, 8), weight_decay=0.05)
    summary = compute(log, tmp_path / "out", ComputeArguments(accumulate_dtype="float64", blocks="full"))
    assert summary["dynamics"]["val"]["checkpoints"] == [5, 8, 12]
    assert summary["dynamics"]["val"]["query_sets"] == ["val.step5", "val.step8", "val"]
    assert set(summary["query_sets"]) == {"val", "other"}  # checkpoint sets are not scored as final
    dyn = load_file(str(tmp_path / "out" / "dynamics-val.safetensors"))
    expected = _naive_dynamics(log, [5, 8, 12], ["val.step5", "val.step8", "val"])
    np.testing.assert_allclose(dyn["mean"].numpy(), expected, equal_nan=True, rtol=RTOL, atol=ATOL)
    assert int(dyn["count"][0].sum()) == 5 * BATCH and int(dyn["count"][2].sum()) == 12 * BATCH
    # The final scores are those of the sequential engine on the same log (checkpoint sets left out).
    compute(
        log, tmp_path / "seq", ComputeArguments(accumulate_dtype="float64", blocks="full", query_sets=("val", "other"))
    )
    assert np.allclose(
        np.load(tmp_path / "seq" / "scores-val.npy"), np.load(tmp_path / "out" / "scores-val.npy"), rtol=RTOL, atol=ATOL
    )


def test_checkpoint_sets_are_not_final_query_sets(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _record(log, checkpoints=(2,), epochs=1)
    with pytest.raises(dvemb.ConfigError, match="before the end of training"):
        compute(log, tmp_path / "out", ComputeArguments(query_sets=("val.step2",)))


def test_float16_embeddings_and_cli_segments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--embeddings-dtype float16`` halves embeddings.npy and leaves scores unrounded; ``--segments`` via the CLI."""
    from dvemb.cli import main

    log = tmp_path / "log"
    _record(log, epochs=2)
    compute(log, tmp_path / "f32", ComputeArguments())
    assert (
        main(
            [
                "compute",
                str(log),
                "--out",
                str(tmp_path / "f16"),
                "--segments",
                "3",
                "--embeddings-dtype",
                "float16",
                "--quiet",
            ]
        )
        == 0
    )
    assert '"segments": 3' in capsys.readouterr().out
    f32, f16 = np.load(tmp_path / "f32" / "embeddings.npy"), np.load(tmp_path / "f16" / "embeddings.npy")
    assert f16.dtype == np.float16 and f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(f16, f32, rtol=2e-3, atol=1e-3 * float(np.abs(f32).max()))
    # float32 recursion, segmented or not: scores agree to float32 rounding, unaffected by the float16 file.
    s32, s16 = np.load(tmp_path / "f32" / "scores-val.npy"), np.load(tmp_path / "f16" / "scores-val.npy")
    np.testing.assert_allclose(s16, s32, rtol=1e-4, atol=1e-6 * float(np.abs(s32).max()))
    with pytest.raises(SystemExit):
        main(["compute", str(log), "--out", str(tmp_path / "bad"), "--segments", "0"])
