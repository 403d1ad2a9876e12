"""A tiny GPT-2 trained by the Hugging Face Trainer on Python's own source text, for the integration tests.

Run as a script (``python hf_task.py OUT LOG BATCH``) it trains once with the dvemb callback; under
``torchrun`` every rank does its part (DDP through accelerate, gloo on CPU).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

from dvemb.integrations.huggingface import DvembCallback, record

SEQ = 24


class SourceChunks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Byte-level chunks of a standard-library module: input ids, labels, an id and the text."""

    def __init__(self, module: str, count: int, offset: int = 0) -> None:
        data = (Path(sysconfig.get_paths()["stdlib"]) / module).read_bytes()
        self.chunks = [data[(offset + i) * SEQ : (offset + i + 1) * SEQ] for i in range(count)]
        self.module = module

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = torch.tensor(list(self.chunks[index]), dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "id": f"{self.module}:{index}",
            "text": self.chunks[index].decode("latin-1"),
        }


def tiny_gpt2(dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    """Two layers, width 32, byte vocabulary, no dropout (so that a replay is exact), seeded."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=256,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype)


def arguments(out: Path, batch: int, steps: int = 6, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": 8,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "optim": "adamw_torch",
        "max_grad_norm": 0.0,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **overrides,
    }
    return TrainingArguments(str(out), **options)


def train_with_callback(
    out: Path, log: Path, batch: int, *, curvature: str = "ggn", **overrides: Any
) -> tuple[Trainer, DvembCallback]:
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=arguments(out, batch, **overrides),
        train_dataset=SourceChunks("textwrap.py", 48),
        eval_dataset=SourceChunks("textwrap.py", 8, offset=48),
        data_collator=default_data_collator,
    )
    callback = record(
        trainer,
        log,
        id_column="id",
        text_column="text",
        calibration_batches=0,
        dtype="float64",
        proj_dim=None,
        shard_steps=3,
        curvature=curvature,
    )
    trainer.train()
    return trainer, callback


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    train_with_callback(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), **distributed)
