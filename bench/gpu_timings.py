"""Device timings for bench/gpu_check.sh: the recorder's step overhead on CUDA, and the engine's recursion
throughput against the device's own matrix-multiply rate measured in the same process.

Run from the repository root on a machine with a CUDA device: ``python -m bench.gpu_timings``. Prints a
markdown table (and writes bench/out/gpu_timings.json); it does not edit BENCHMARKS.md, since the machine
that runs it is usually not the one that commits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dvemb
from bench.recorder_overhead import ce_loss, lm_task
from dvemb.engine.recursion import BlockedRecursion, Chunk

DEVICE = "cuda"  # ``--device cpu`` runs the same code on the CPU (to check the script without a GPU)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def recorder_ratio(steps: int = 30) -> dict[str, float]:
    """Median step time of the transformer LM with and without the recorder, on the device."""
    model, batches, _ = lm_task(16, 128, 128, 256, 4)
    model = model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(x.to(DEVICE), y.to(DEVICE), ids) for x, y, ids in batches]
    times: dict[str, list[float]] = {"plain": [], "dvemb": []}
    with tempfile.TemporaryDirectory() as tmp:
        rec = dvemb.Recorder(model, Path(tmp) / "log", projection="random", shard_size_mb=64)
        for i in range(2 * steps):
            x, y, ids = batches[i % len(batches)]
            kind = "dvemb" if i % 2 else "plain"
            _sync()
            start = time.perf_counter()
            if kind == "dvemb":
                with rec.step(ids, optimizer):
                    ce_loss(model(x), y).backward()
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                ce_loss(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
            _sync()
            if i >= 10:
                times[kind].append(time.perf_counter() - start)
        rec.close()
    plain, recorded = statistics.median(times["plain"]), statistics.median(times["dvemb"])
    return {"plain_ms": 1e3 * plain, "dvemb_ms": 1e3 * recorded, "ratio": recorded / plain}


def gemm_rate(d: int) -> float:
    """float32 GFLOP/s of a (d, d) @ (d, d) product on the device, TF32 off."""
    a, b = torch.randn(d, d, device=DEVICE), torch.randn(d, d, device=DEVICE)
    for _ in range(3):
        a @ b
    _sync()
    start, reps = time.perf_counter(), 50
    for _ in range(reps):
        a @ b
    _sync()
    return 2 * d**3 * reps / (time.perf_counter() - start) / 1e9


def engine_rate(d: int, batch: int = 64, steps: int = 64) -> float:
    """GFLOP/s of the blocked recursion (about ``4 d^2 + 3 n d`` flops per row) on the device."""
    recursion = BlockedRecursion(1, d, dtype=torch.float32, device=torch.device(DEVICE))
    rows = batch * steps
    grads = torch.randn(1, rows, d, device=DEVICE) * 1e-2
    step_of = torch.arange(steps, device=DEVICE).repeat_interleave(batch)
    chunk = Chunk(
        grads,
        step_of,
        None,
        None,
        torch.arange(steps, device=DEVICE),
        torch.full((1, steps), 1e-3, device=DEVICE, dtype=torch.float64),
        torch.ones((1, steps), device=DEVICE, dtype=torch.float64),
    )
    recursion.process(chunk)
    _sync()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        recursion.process(chunk)
    _sync()
    return (4 * d * d + 3 * rows * d) * rows * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    DEVICE = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    result: dict[str, object] = {"device": name, "torch": torch.__version__}
    result["recorder"] = recorder_ratio()
    engine = {}
    for d in args.sizes:
        gemm, rate = gemm_rate(d), engine_rate(d)
        engine[str(d)] = {"gemm_gflops": gemm, "engine_gflops": rate, "share": rate / gemm}
    result["engine"] = engine
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "gpu_timings.json").write_text(json.dumps(result, indent=1))
    rec = result["recorder"]
    print(f"device {result['device']}, torch {result['torch']}")
    print(
        f"recorder (transformer LM, AdamW): plain {rec['plain_ms']:.2f} ms, dvemb {rec['dvemb_ms']:.2f} ms, {rec['ratio']:.2f}x"
    )
    print("| d | GEMM GFLOP/s | engine GFLOP/s | share |\n|---:|---:|---:|---:|")
    for d, row in engine.items():
        print(f"| {d} | {row['gemm_gflops']:.0f} | {row['engine_gflops']:.0f} | {row['share']:.0%} |")


if __name__ == "__main__":
    main()
