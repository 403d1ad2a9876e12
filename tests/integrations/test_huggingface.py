"""The Hugging Face Trainer callback against the plain recorder, transformers' Conv1D against a naive
per-example reference, tied embeddings, and DDP through accelerate (torchrun, two gloo ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_task import SEQ, SourceChunks, arguments, tiny_gpt2, train_with_callback
from transformers import Trainer, default_data_collator

import dvemb
from dvemb.integrations.huggingface import causal_lm_loss, record
from dvemb.reader import GradientLog

HERE = Path(__file__).parent


def _steps(log: GradientLog, *, curvature: bool = False) -> list[tuple[list[object], float, dict[str, torch.Tensor]]]:
    """(ids, lr of the first layer, per-layer rows) of every step of a log; with ``curvature`` the rows are the
    step's Gauss-Newton factor rows (B, R, d) instead of its gradients."""
    out = []
    for shard in log.iter_shards():
        for position, step in enumerate(shard.steps.tolist()):
            rows = shard.row_step == step
            ids = [i for i, keep in zip(shard.example_ids, rows.tolist(), strict=True) if keep]
            tensors = shard.curvature if curvature else shard.grads
            out.append((ids, float(shard.lr[position, 0]), {k: v[rows] for k, v in tensors.items()}))
    return out


def _batch(data: SourceChunks, indices: list[int]) -> dict[str, torch.Tensor]:
    return default_data_collator([{k: data[i][k] for k in ("input_ids", "labels")} for i in indices])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_trainer_callback_log_equals_the_plain_recorder(tmp_path: Path) -> None:
    """Gradient accumulation over two micro-batches, AdamW with the Trainer's linear schedule, float64."""
    train_with_callback(tmp_path / "out", tmp_path / "hf", 4, gradient_accumulation_steps=2)
    hf = dvemb.open_log(tmp_path / "hf")
    assert hf.complete and hf.num_steps == 6 and hf.manifest["optimizer"]["propagation"] == "adamw"

    model, data = tiny_gpt2(), SourceChunks("textwrap.py", 48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (6 - s) / 6)  # the Trainer's linear decay
    rec = dvemb.Recorder(model, tmp_path / "plain", proj_dim=None, dtype="float64", shard_steps=3, projection="random")
    for ids, _, _ in _steps(hf):
        with rec.step(ids, optimizer):
            step_loss = 0.0
            for half in (ids[:4], ids[4:]):
                indices = [int(str(i).split(":")[1]) for i in half]
                # The Trainer divides the step's summed token losses by its count of labels (before the shift).
                items = torch.tensor(2 * 4 * SEQ)
                loss = model(**_batch(data, indices), num_items_in_batch=items).loss
                loss.backward()
                step_loss += float(loss.detach())
            rec.log_loss(step_loss)  # the step's loss: the micro-batches' shares of its token mean, added
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    evaluation = SourceChunks("textwrap.py", 8, offset=48)
    batch = _batch(evaluation, list(range(8)))
    rec.record_queries("eval", [({"input_ids": batch["input_ids"]}, batch["labels"])], loss_fn=causal_lm_loss)
    rec.close()

    plain = dvemb.open_log(tmp_path / "plain")
    assert [layer.name for layer in hf.layers] == [layer.name for layer in plain.layers]
    # The callback logs the Trainer's training loss of every step (issue 24): the phase plot draws it.
    hf_loss = torch.cat([shard.loss for shard in hf.iter_shards()])
    plain_loss = torch.cat([shard.loss for shard in plain.iter_shards()])
    assert bool(torch.isfinite(hf_loss).all()) and len(hf_loss) == 6
    torch.testing.assert_close(hf_loss, plain_loss, rtol=1e-10, atol=0)
    for (ids, lr, rows), (ids_p, lr_p, rows_p) in zip(_steps(hf), _steps(plain), strict=True):
        assert ids == ids_p and lr == pytest.approx(lr_p, rel=1e-12)
        for name, ours in rows.items():
            assert _relative(ours, rows_p[name]) < 1e-10, name
    # ggn by default on both paths: the Gauss-Newton rows found at the logits (one sampled label per token)
    assert hf.manifest["curvature"]["mode"] == plain.manifest["curvature"]["mode"] == "ggn"
    assert hf.manifest["curvature"]["source"] == "output"
    for (_, _, rows), (_, _, rows_p) in zip(_steps(hf, curvature=True), _steps(plain, curvature=True), strict=True):
        for name, ours in rows.items():
            assert ours.shape[1] == 1 and _relative(ours, rows_p[name]) < 1e-10, name
    ours_q, theirs_q = hf.load_query_set("eval"), plain.load_query_set("eval")
    for name, grads in theirs_q.grads.items():
        assert _relative(ours_q.grads[name], grads) < 1e-10, name
    texts = {e["id"]: e.get("text") for e in hf.iter_examples()}
    assert len(texts) == 48 and texts["textwrap.py:0"] == data[0]["text"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_records_the_same_log(tmp_path: Path, reentrant: bool) -> None:
    """Non-reentrant checkpointing runs each block's forward twice with gradients (the recompute must be
    ignored); reentrant checkpointing runs it first without gradients (the recompute must be recorded).
    The Gauss-Newton rows (the default) start at the logits before backward reaches the blocks, so they need
    non-reentrant checkpointing; reentrant checkpointing is recorded in empirical mode."""
    curvature = {"curvature": "empirical"} if reentrant else {}
    train_with_callback(tmp_path / "o1", tmp_path / "plain", 4, gradient_accumulation_steps=2, **curvature)
    checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": reentrant}}
    train_with_callback(
        tmp_path / "o2", tmp_path / "ckpt", 4, gradient_accumulation_steps=2, **checkpointing, **curvature
    )
    plain, ckpt = dvemb.open_log(tmp_path / "plain"), dvemb.open_log(tmp_path / "ckpt")
    for which in (False, True) if not reentrant else (False,):
        steps = zip(_steps(plain, curvature=which), _steps(ckpt, curvature=which), strict=True)
        for (ids, lr, rows), (ids_c, lr_c, rows_c) in steps:
            assert ids == ids_c and lr == lr_c
            for name, ours in rows.items():
                assert _relative(rows_c[name], ours) < 1e-12, name


def test_ggn_under_reentrant_checkpointing_says_what_to_do(tmp_path: Path) -> None:
    checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}
    with pytest.raises(dvemb.RecorderError, match="use_reentrant=False"):
        train_with_callback(tmp_path / "o", tmp_path / "log", 4, **checkpointing)


def test_conv1d_and_tied_embedding_rows_equal_a_naive_per_example_reference(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers and its tied input embedding / LM head (one layer, both paths summed), against
    one backward pass per example (float64, no projection)."""
    model, data = tiny_gpt2(), SourceChunks("textwrap.py", 3)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None, dtype="float64", projection="random")
    assert rec.tracked_by_kind()["conv1d"]["layers"] == 8
    assert [(a.name, rec._partners(a)) for a in rec.layers if rec._partners(a)] == [("transformer.wte", ["lm_head"])]
    # every trainable parameter but positions and layer norms, tied weight counted once
    untracked = sum(p.numel() for n, p in model.named_parameters() if "wpe" in n or "ln" in n)
    assert rec.tracked_parameters == rec.total_parameters - untracked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss(indices: list[int]) -> torch.Tensor:  # transformers' own loss runs in float32: ours stays in float64
        batch = _batch(data, indices)
        return causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).mean()

    with rec.step([0, 1, 2], optimizer):
        loss([0, 1, 2]).backward()
        optimizer.step()
        optimizer.zero_grad()
    rec.close()
    rows = next(dvemb.open_log(tmp_path / "log").iter_shards()).grads

    for example in range(3):
        model.zero_grad()
        loss([example]).backward()
        for name, module in model.named_modules():
            if type(module).__name__ == "Conv1D":
                expected = torch.cat([module.weight.grad.T, module.bias.grad[:, None]], 1).flatten()
                assert _relative(rows[name][example], expected) < 1e-10, name
        tied = model.transformer.wte.weight.grad.flatten()  # both paths: embedding lookup and LM head
        assert _relative(rows["transformer.wte"][example], tied) < 1e-10


def test_record_calibrates_the_projection_by_default(tmp_path: Path) -> None:
    """The callback fits curvature-aware bases on the first training batches before the first step: the
    Conv1D layers and the tied embedding / LM head (one basis from both paths) are calibrated."""
    trainer = Trainer(
        model=tiny_gpt2(torch.float32),
        args=arguments(tmp_path / "out", 4, steps=2),
        train_dataset=SourceChunks("textwrap.py", 16),
        data_collator=default_data_collator,
    )
    record(trainer, tmp_path / "log", calibration_batches=2, proj_dim=64)
    trainer.train()
    log = dvemb.open_log(tmp_path / "log")
    assert log.complete and log.num_steps == 2
    assert log.manifest["projection"]["kind"] == "calibrated"
    assert log.manifest["projection"]["calibration"]["examples"] == 8
    bases = {entry["name"]: entry["basis"] for entry in log.manifest["layers"]}
    assert "transformer.wte" in bases and set(bases.values()) == {"calibrated"}


def test_record_looks_ahead_by_default_and_leaves_training_unchanged(tmp_path: Path) -> None:
    """The one-liner's defaults: ggn rows from the logits, bases fitted a tenth into training (look-ahead with
    the Trainer's AdamW and warm-up schedule, then everything restored): the trained weights are bit-identical
    to a run without dvemb."""

    def trainer(out: str) -> Trainer:
        options = {"warmup_steps": 3, "lr_scheduler_type": "cosine"}
        return Trainer(
            model=tiny_gpt2(torch.float32),
            args=arguments(tmp_path / out, 4, steps=20, **options),
            train_dataset=SourceChunks("textwrap.py", 32),
            data_collator=default_data_collator,
        )

    recorded, plain = trainer("recorded"), trainer("plain")
    record(recorded, tmp_path / "log", calibration_batches=2, proj_dim=64)
    recorded.train()
    plain.train()
    for (name, ours), theirs in zip(
        recorded.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    manifest = dvemb.open_log(tmp_path / "log").manifest
    assert manifest["projection"]["calibration"]["lookahead_steps"] == 2
    assert manifest["curvature"]["mode"] == "ggn" and manifest["curvature"]["source"] == "output"


def test_record_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    from hf_task import arguments
    from transformers import Trainer

    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(tmp_path, 4),
        train_dataset=SourceChunks("textwrap.py", 8),
        data_collator=default_data_collator,
    )
    with pytest.raises(dvemb.ConfigError, match="id_column='uid' is not a column"):
        record(trainer, tmp_path / "log", id_column="uid")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_through_accelerate_equals_one_process(tmp_path: Path) -> None:
    """torchrun with two gloo ranks (per-device batch 4) against one process with batch 8: the Trainer's
    sampler gives rank r the r-th of every two batches, so the merged steps are the single process's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent.parent}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(HERE / "hf_task.py"),
            str(tmp_path / "o2"),
            str(tmp_path / "ddp"),
            "4",
        ],
        env=env,
        check=True,
        timeout=240,
    )
    subprocess.run(
        [sys.executable, str(HERE / "hf_task.py"), str(tmp_path / "o1"), str(tmp_path / "single"), "8"],
        env=env,
        check=True,
        timeout=240,
    )
    ddp, single = dvemb.open_log(tmp_path / "ddp"), dvemb.open_log(tmp_path / "single")
    assert ddp.world_size == 2 and ddp.num_steps == single.num_steps == 6
    for (ids, lr, rows), (ids_s, lr_s, rows_s) in zip(_steps(ddp), _steps(single), strict=True):
        assert ids == ids_s and lr == pytest.approx(lr_s, rel=1e-12)
        for name, ours in rows.items():
            assert _relative(ours, rows_s[name]) < 1e-9, name


def test_dynamics_every_records_checkpoint_query_sets(tmp_path: Path) -> None:
    """``dynamics_every=2`` records the eval set at steps 2 and 4 of 6 (and at the end), and the engine turns them
    into value dynamics with checkpoints 2, 4 and 6."""
    from dvemb.engine import ComputeArguments, compute

    trainer = Trainer(
        model=tiny_gpt2(torch.float32),
        args=arguments(tmp_path / "out", 4, steps=6),
        train_dataset=SourceChunks("textwrap.py", 24),
        eval_dataset=SourceChunks("textwrap.py", 4, offset=24),
        data_collator=default_data_collator,
    )
    record(trainer, tmp_path / "log", calibration_batches=0, proj_dim=16, dynamics_every=2)
    trainer.train()
    log = dvemb.open_log(tmp_path / "log")
    assert [(q["name"], q["step"]) for q in log.manifest["query_sets"]] == [
        ("eval.step2", 2),
        ("eval.step4", 4),
        ("eval", 6),
    ]
    summary = compute(tmp_path / "log", tmp_path / "results", ComputeArguments())
    assert summary["dynamics"]["eval"]["checkpoints"] == [2, 4, 6]
    assert list(summary["query_sets"]) == ["eval"]
