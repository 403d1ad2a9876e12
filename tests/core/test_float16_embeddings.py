"""The sequential engine's float16 embeddings file: the float32 embeddings rounded to nearest, scores unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb.engine import ComputeArguments, compute


def test_float16_file_is_the_rounded_float32_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(inputs=5, hidden=8, classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    rec = dvemb.Recorder(model, tmp_path / "log", shard_steps=3)
    for step in range(8):
        ids = torch.arange(4 * step, 4 * step + 4)
        with rec.step(ids, opt):
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    rec.record_queries("val", [(torch.randn(6, 5), torch.randint(0, 3, (6,)))])
    rec.close()
    compute(tmp_path / "log", tmp_path / "f32", ComputeArguments())
    compute(tmp_path / "log", tmp_path / "f16", ComputeArguments(embeddings_dtype="float16"))
    f32, f16 = np.load(tmp_path / "f32" / "embeddings.npy"), np.load(tmp_path / "f16" / "embeddings.npy")
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    assert np.abs(f32).max() > 0
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    s32, s16 = np.load(tmp_path / "f32" / "scores-val.npy"), np.load(tmp_path / "f16" / "scores-val.npy")
    np.testing.assert_array_equal(s16, s32)
