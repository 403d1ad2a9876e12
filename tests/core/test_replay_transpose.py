"""FunctionalOptimizer.pull_back, the update's written-out transpose, equals autograd through
FunctionalOptimizer.step (the differentiable update) at float64 round-off: every optimizer of the replay, at its
first step and later, including Adam's coordinates whose second moment is exactly 0."""

from __future__ import annotations

import pytest
import torch

from dvemb.replay.optimizers import FunctionalOptimizer
from tests.core.test_replay import OPTIMIZERS


@pytest.mark.parametrize("later", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize("name", [*OPTIMIZERS, "plain-sgd", "nesterov-first"])
def test_pull_back_equals_autograd_through_the_update(name: str, later: bool) -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    make = {"plain-sgd": lambda p: torch.optim.SGD(p, lr=0.1), **OPTIMIZERS}
    make["nesterov-first"] = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, nesterov=True)
    optimizer = make[name]([p.clone().requires_grad_(True) for p in params])
    functional, state = FunctionalOptimizer.from_torch(optimizer, optimizer.param_groups[0]["params"])
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    grads[1][0] = 0.0  # with a zero state: Adam's v' is exactly 0 there (the derivative of sqrt taken as 0)
    if later:
        slots = [torch.rand(t.shape, generator=g, dtype=torch.float64) for t in state.flat()]
        slots = [s if i % 2 == 0 or "adam" not in name else s.pow(2) for i, s in enumerate(slots)]
        state = state.with_flat(slots, tuple(3 for _ in state.counts))
    K = 2
    lam = [torch.randn((K, *t.shape), generator=g, dtype=torch.float64) for t in [*params, *state.flat()]]
    lrs = [0.1]

    a_params, a_slots, u = functional.pull_back(params, grads, state, lrs, lam)

    leaves = [t.clone().requires_grad_(True) for t in [*params, *state.flat(), *grads]]
    P, S = len(params), len(state.flat())
    new_params, new_state = functional.step(leaves[:P], leaves[P + S :], state.with_flat(leaves[P : P + S]), lrs)
    outputs = [*new_params, *new_state.flat()]
    for k in range(K):
        wanted = torch.autograd.grad(outputs, leaves, [x[k] for x in lam], retain_graph=True, allow_unused=True)
        got = [a[k] for a in a_params] + [a[k] for a in a_slots] + [x[k] for x in u if x is not None]
        for want, have, leaf in zip(wanted, got, leaves, strict=True):
            want = torch.zeros_like(leaf) if want is None else want
            torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)
