"""CUDA checks (skipped without a device; bench/gpu_check.sh runs them on a GPU machine): the recorder on
the device equals the CPU one, and bf16 autocast on the device agrees with float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyLM

import dvemb

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _record(log: Path, device: str, autocast: bool = False) -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab=11, width=8, hidden=16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(1, 11, (24, 9), generator=torch.Generator().manual_seed(1)).to(device)
    rec = dvemb.Recorder(model, log, proj_dim=(4, 4), layers="all", projection="random", dtype="float32")
    for step in range(3):
        ids = list(range(step * 8, step * 8 + 8))
        with rec.step(ids, optimizer), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[ids, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), tokens[ids, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.close()


def _rows(log: Path) -> dict[str, torch.Tensor]:
    shard = next(dvemb.open_log(log).iter_shards())
    return {name: rows.double() for name, rows in shard.grads.items()}


def test_recorder_on_cuda_equals_cpu(tmp_path: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    _record(tmp_path / "cpu", "cpu")
    _record(tmp_path / "cuda", "cuda")
    cpu, cuda = _rows(tmp_path / "cpu"), _rows(tmp_path / "cuda")
    for name, rows in cpu.items():
        assert (rows - cuda[name]).abs().max() <= 1e-4 * rows.abs().max(), name


def test_bf16_autocast_on_cuda_stays_close_to_float32(tmp_path: Path) -> None:
    _record(tmp_path / "f32", "cuda")
    _record(tmp_path / "bf16", "cuda", autocast=True)
    full, half = _rows(tmp_path / "f32"), _rows(tmp_path / "bf16")
    for name, rows in full.items():
        cosine = F.cosine_similarity(rows.flatten(), half[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
