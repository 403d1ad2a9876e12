"""Distributed data parallel: each rank writes its own shards; the reader merges them step by step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dvemb

_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.nn.functional as F, torch.distributed as dist
    import dvemb
    torch.set_default_dtype(torch.float64)
    log_dir, distributed = sys.argv[1], sys.argv[2] == "ddp"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2) if sys.argv[3] == "sgd" else torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 6, generator=generator), torch.randint(0, 3, (4, 6), generator=generator)
    calibrated = sys.argv[4] == "calibrated"
    rec = dvemb.Recorder(trained, log_dir, proj_dim=(3, 4) if calibrated else None, dtype="float64", shard_steps=2)
    local = slice(3 * rank, 3 * rank + 3) if distributed else slice(0, 6)
    if calibrated:  # each rank sees its half of the batches; the all-reduced sums give everyone the same bases
        rec.calibrate([(x[s, local], y[s, local]) for s in range(4)])
    for step in range(4):
        ids = [6 * step + i for i in range(6)][local]
        rec.describe(ids, texts=[f"example {i}" for i in ids])  # every rank describes its own examples
        with rec.step(ids, optimizer):
            F.cross_entropy(trained(x[step, local]), y[step, local]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    if distributed:
        dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("optimizer", "projection"), [("sgd", "whole"), ("adam", "whole"), ("sgd", "calibrated")])
def test_two_ranks_merge_into_the_single_process_log(tmp_path: Path, optimizer: str, projection: str) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, str(tmp_path / "ddp"), "ddp", optimizer, projection],
            env={**env, "RANK": str(r)},
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "single"), "single", optimizer, projection],
        check=True,
        timeout=120,
    )

    ddp, single = dvemb.open_log(tmp_path / "ddp"), dvemb.open_log(tmp_path / "single")
    assert ddp.world_size == 2 and (tmp_path / "ddp" / "manifest.rank1.json").exists()
    # Each rank's example metadata in files of its own (one name for both raced and overwrote each other), read
    # together, each file whole (its sha256 in its rank's manifest).
    described = sorted((tmp_path / "ddp").glob("examples-*.jsonl"))
    assert [p.name for p in described] == ["examples-000000.jsonl", "examples-000000.rank1.jsonl"]
    for path in described:
        ddp.validate_file(path.name, path)
    texts = {record["id"]: record["text"] for record in ddp.iter_examples()}
    assert texts == {record["id"]: record["text"] for record in single.iter_examples()}
    assert len(texts) == 24
    assert ddp.complete and ddp.num_steps == single.num_steps == 4 and ddp.num_shards() == 2
    for merged, reference in zip(ddp.iter_shards(), single.iter_shards(), strict=True):
        assert merged.example_ids == reference.example_ids  # rank 0's rows, then rank 1's, step by step
        assert torch.equal(merged.batch_size, reference.batch_size)
        for ours, theirs in zip(merged.grads.values(), reference.grads.values(), strict=True):
            assert (ours - theirs).abs().max() < 1e-10 * theirs.abs().max()
        ours_state = {k.replace("module.", ""): v for k, v in merged.optimizer.items()}  # DDP's layer names
        assert ours_state.keys() == reference.optimizer.keys()
        assert bool(ours_state) == (optimizer == "adam")  # Adam's state per step; plain SGD needs none
        for key, theirs in reference.optimizer.items():
            assert (ours_state[key] - theirs).abs().max() <= 1e-10 * theirs.abs().max(), key
