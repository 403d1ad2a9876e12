"""Exact replay of a Trainer run (issue 22): ``record(trainer, log, initial_dir=...)`` keeps the starting point,
``replay_trainer`` rebuilds the model, the optimizer, the batches and the Trainer's loss from the Trainer and the
log, and replays the very trajectory the Trainer took: its logged losses to their float32 storage (a loss that
divides by the shifted tokens instead of the labels the Trainer counts is 4% off)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_task import SourceChunks, arguments, tiny_gpt2
from transformers import Trainer, default_data_collator

import dvemb
from dvemb.integrations.hf_replay import bundle_trainer, replay_trainer
from dvemb.integrations.huggingface import causal_lm_loss, record
from dvemb.replay import ReplayArguments, replay, schedule_from_log
from dvemb.replay.bundle import BUNDLE_NAME, open_bundle


def _trained(tmp_path: Path, bf16: bool = False, **record_options: object) -> Trainer:
    model = tiny_gpt2(torch.float32 if bf16 else torch.float64)  # autocast casts float32 only
    if bf16:  # the replay's attention (it needs double backward), which in bfloat16 rounds unlike the fused kernel
        model.set_attn_implementation("eager")
    trainer = Trainer(
        model=model,
        args=arguments(
            tmp_path / "out", 4, steps=6, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1, bf16=bf16
        ),
        train_dataset=SourceChunks("textwrap.py", 24),
        eval_dataset=SourceChunks("textwrap.py", 6, offset=24),
        data_collator=default_data_collator,
    )
    record(
        trainer,
        tmp_path / "log",
        id_column="id",
        calibration_batches=0,
        dtype="float64",
        proj_dim=None,
        **record_options,  # type: ignore[arg-type]
    )
    trainer.train()
    return trainer


def test_a_trainer_run_replays_its_own_trajectory(tmp_path: Path) -> None:
    trainer = _trained(tmp_path, initial_dir=tmp_path / "initial")
    assert (tmp_path / "initial" / "initial.json").exists()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = replay_trainer(
        trainer, tmp_path / "log", tmp_path / "initial", id_column="id", arguments=ReplayArguments(query_columns="each")
    )
    gap = result.summary["loss_gap"]
    assert gap is not None and gap < 3e-7, gap  # the replayed losses are the Trainer's, step by step (float32 log)
    log = dvemb.open_log(tmp_path / "log")
    rows = sum(log.num_rows(i) for i in range(log.num_shards()))
    assert result.scores.shape == (rows, 6)  # every occurrence, one column per evaluation example
    assert np.isfinite(result.scores).all() and np.abs(result.scores).max() > 0
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the Trainer's model is left as it was


def test_a_bf16_trainer_run_is_replayed_under_its_autocast(tmp_path: Path) -> None:
    """``bf16=True`` (autocast on the CPU, float32 weights): the default recorder finds its Gauss-Newton rows
    although accelerate returns float32 copies of the logits that the loss never saw; the replay takes the Trainer's
    mixed precision and follows its losses to their float32 storage; under float16 it drifts by far more."""
    trainer = _trained(tmp_path, bf16=True, initial_dir=tmp_path / "initial")
    shard = next(dvemb.open_log(tmp_path / "log").iter_shards())
    for name, rows in shard.curvature.items():
        assert torch.isfinite(rows).all() and rows.abs().max() > 0, name
    result = replay_trainer(trainer, tmp_path / "log", tmp_path / "initial", id_column="id")
    assert result.summary["autocast"] == "bfloat16"
    assert result.summary["loss_gap"] is not None and result.summary["loss_gap"] < 3e-7, result.summary["loss_gap"]
    assert np.isfinite(result.scores).all()
    other = replay_trainer(
        trainer, tmp_path / "log", tmp_path / "initial", id_column="id", arguments=ReplayArguments(autocast="float16")
    )
    assert other.summary["loss_gap"] > 3e-6, other.summary["loss_gap"]  # float16 rounds where bfloat16 ran


def test_the_models_own_token_mean_is_not_the_trainers_loss(tmp_path: Path) -> None:
    trainer = _trained(tmp_path, initial_dir=tmp_path / "initial")
    wrong = replay_trainer(trainer, tmp_path / "log", tmp_path / "initial", id_column="id", loss_fn=causal_lm_loss)
    assert wrong.summary["loss_gap"] > 1e-2  # 23/24 of the Trainer's: the gap check would catch it


def test_a_run_without_its_starting_point_is_refused_with_the_fix(tmp_path: Path) -> None:
    trainer = _trained(tmp_path)
    with pytest.raises(dvemb.ConfigError, match="holds no initial state"):
        replay_trainer(trainer, tmp_path / "log", tmp_path / "initial", id_column="id")


def test_the_loss_counts_the_labels_as_the_trainer_does() -> None:
    """The Trainer's ``num_items_in_batch``: shifted labels for a loss that shifts them (``*ForCausalLM``), all labels
    for GPT-2 here, and the model's own token mean when the Trainer counts nothing."""
    from types import SimpleNamespace

    from dvemb.integrations.hf_replay import trainer_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    labels[1, 3] = -100
    token_sums = torch.stack(
        [
            torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
            for b in range(2)
        ]
    )
    shifted = (labels[:, 1:] != -100).sum(1).double()
    every = (labels != -100).sum(1).double()
    cases = [
        ({"model_accepts_loss_kwargs": True, "compute_loss_func": None, "_loss_shifts_labels": True}, shifted),
        ({"model_accepts_loss_kwargs": True, "compute_loss_func": None, "_loss_shifts_labels": False}, every),
        ({"model_accepts_loss_kwargs": False, "compute_loss_func": None, "_loss_shifts_labels": False}, shifted),
    ]
    for settings, counted in cases:
        got = trainer_loss(SimpleNamespace(**settings))(logits, labels)  # type: ignore[arg-type]
        torch.testing.assert_close(got, token_sums / counted, rtol=1e-12, atol=0)


def test_a_trainer_runs_bundle_replays_as_replay_trainer_does(tmp_path: Path) -> None:
    """The bundle the service replays (``bundle_trainer``): the model rebuilt from its config, the examples by id and
    the Trainer's loss give replay_trainer's scores (to round-off) and its loss gap."""
    trainer = _trained(tmp_path, initial_dir=tmp_path / "initial")
    direct = replay_trainer(trainer, tmp_path / "log", tmp_path / "initial", id_column="id")
    path = bundle_trainer(trainer, tmp_path / "initial", tmp_path / "log" / BUNDLE_NAME, id_column="id")
    built = open_bundle(path)
    assert type(built.model).__name__ == "GPT2LMHeadModel" and set(built.query_sets) == {"eval"}
    assert built.model.lm_head.weight is built.model.transformer.wte.weight  # tied as the config says
    rebuilt = replay(
        built.model, built.optimizer, schedule_from_log(tmp_path / "log"), built.loss_fn, built.examples,
        built.query_sets["eval"], ReplayArguments(), query_set="eval",
    )  # fmt: skip
    assert np.abs(rebuilt.scores - direct.scores).max() <= 1e-9 * np.abs(direct.scores).max()
    assert rebuilt.summary["loss_gap"] < 3e-7
