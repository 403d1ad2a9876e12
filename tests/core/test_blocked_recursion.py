"""The blocked recursion's halving solve against the naive per-step recursion, whatever the block size."""

from __future__ import annotations

import pytest
import torch

from dvemb.engine.recursion import BlockedRecursion, Chunk, reference_embeddings

DIM = 6


def _run_blocked(
    grads: list[torch.Tensor],
    curv: list[torch.Tensor] | None,
    rate: list[float],
    decay: list[float],
    chunk_steps: int,
    leaf_rows: int,
) -> list[torch.Tensor]:
    """Embeddings per step from BlockedRecursion fed chunks of ``chunk_steps`` steps, newest first."""
    steps = len(grads)
    recursion = BlockedRecursion(1, DIM, dtype=torch.float64, device=torch.device("cpu"), leaf_rows=leaf_rows)
    out: list[torch.Tensor] = [torch.empty(0)] * steps
    end = steps
    while end > 0:
        lo = max(0, end - chunk_steps)
        rows = [len(grads[t]) for t in range(lo, end)]
        grad_steps = torch.repeat_interleave(torch.arange(lo, end), torch.tensor(rows))
        c = cs = None
        if curv is not None:
            c = torch.cat(curv[lo:end]).unsqueeze(0)
            cs = torch.repeat_interleave(torch.arange(lo, end), torch.tensor([len(curv[t]) for t in range(lo, end)]))
        chunk = Chunk(
            torch.cat(grads[lo:end]).unsqueeze(0),
            grad_steps,
            c,
            cs,
            torch.arange(lo, end),
            torch.tensor([rate[lo:end]], dtype=torch.float64),
            torch.tensor([decay[lo:end]], dtype=torch.float64),
        )
        embeddings = recursion.process(chunk)[0]
        for t, part in zip(range(lo, end), embeddings.split(rows), strict=True):
            out[t] = part
        end = lo
    return out


@pytest.mark.parametrize("mode", ["empirical", "ggn"])
@pytest.mark.parametrize("leaf_rows", [1, 3, 8, 1000])
@pytest.mark.parametrize("chunk_steps", [1, 4, 11, 100])
def test_halving_solve_equals_the_naive_recursion(mode: str, leaf_rows: int, chunk_steps: int) -> None:
    generator = torch.Generator().manual_seed(leaf_rows * 100 + chunk_steps)
    sizes = [1, 5, 2, 7, 1, 1, 4, 9, 3] * 3  # uneven steps: the split falls between steps, never inside one
    grads = [0.5 * torch.randn(b, DIM, generator=generator, dtype=torch.float64) for b in sizes]
    curv = [0.5 * torch.randn(2 * b, DIM, generator=generator, dtype=torch.float64) for b in sizes]
    rate = [0.1 + 0.01 * t for t in range(len(sizes))]
    decay = [1 - 0.001 * t for t in range(len(sizes))]
    used = curv if mode == "ggn" else None
    expected = reference_embeddings(grads, used, rate, decay)
    got = _run_blocked(grads, used, rate, decay, chunk_steps, leaf_rows)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


def test_halving_matches_the_direct_solve_bit_for_bit_in_shape() -> None:
    """The halving path (small leaves) and the single triangular solve (one leaf) agree on one chunk."""
    generator = torch.Generator().manual_seed(0)
    sizes = [16] * 32
    grads = [torch.randn(b, DIM, generator=generator, dtype=torch.float64) / DIM for b in sizes]
    rate, decay = [0.05] * len(sizes), [1.0] * len(sizes)
    halved = _run_blocked(grads, None, rate, decay, 32, 16)
    direct = _run_blocked(grads, None, rate, decay, 32, 10_000)
    for a, b in zip(halved, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
