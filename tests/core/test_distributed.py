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

#: The (optimizer, projection) cases, each recorded by the same processes (a process group and a torch import each
#: cost seconds: two ranks and a single process for all three cases, not for each).
CASES = [("sgd", "whole"), ("adam", "whole"), ("sgd", "calibrated")]

_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.nn.functional as F, torch.distributed as dist
    import dvemb
    torch.set_default_dtype(torch.float64)
    out, distributed = sys.argv[1], sys.argv[2] == "ddp"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    for case in sys.argv[3:]:
        optimizer_name, projection = case.split("-")
        log_dir = os.path.join(out, case)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2) if optimizer_name == "sgd" else torch.optim.Adam(model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 6, 6, generator=generator), torch.randint(0, 3, (4, 6), generator=generator)
        calibrated = projection == "calibrated"
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


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case recorded by two ranks (``ddp/<case>``) and by one process (``single/<case>``)."""
    out = tmp_path_factory.mktemp("distributed")
    cases = [f"{optimizer}-{projection}" for optimizer, projection in CASES]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    processes = [
        subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out / "ddp"), "ddp", *cases], env={**env, "RANK": str(r)})
        for r in range(2)
    ]
    processes.append(subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out / "single"), "single", *cases]))
    assert [p.wait(timeout=180) for p in processes] == [0, 0, 0]
    return out


@pytest.mark.parametrize(("optimizer", "projection"), CASES)
def test_two_ranks_merge_into_the_single_process_log(recorded: Path, optimizer: str, projection: str) -> None:
    ddp_dir, single_dir = (
        recorded / "ddp" / f"{optimizer}-{projection}",
        recorded / "single" / f"{optimizer}-{projection}",
    )
    ddp, single = dvemb.open_log(ddp_dir), dvemb.open_log(single_dir)
    assert ddp.world_size == 2 and (ddp_dir / "manifest.rank1.json").exists()
    # Each rank's example metadata in files of its own (one name for both raced and overwrote each other), read
    # together, each file whole (its sha256 in its rank's manifest).
    described = sorted(ddp_dir.glob("examples-*.jsonl"))
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
