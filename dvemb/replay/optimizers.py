"""The optimizer's update as a differentiable function: PyTorch's SGD, Adam and AdamW, one step at a time.

The replay differentiates through this function (docs/replay.md, section 2): its value reproduces
``torch.optim``'s update (same operations, same order, so a float64 replay follows the recorded training to
round-off) and its derivative is the optimizer's exact first-order map, Adam's second moment included. The one
convention beyond PyTorch: where Adam's ``v_hat`` is exactly 0 (a coordinate that never had a gradient) the
derivative of ``sqrt(v_hat)`` is taken as 0 instead of infinity (its tangent there is 0 anyway).

Implementations: :class:`FunctionalOptimizer` (built from a ``torch.optim`` optimizer by :meth:`from_torch`);
the state it carries is a :class:`OptimizerState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dvemb.errors import ConfigError

__all__ = ["SUPPORTED", "FunctionalOptimizer", "GroupSettings", "OptimizerState"]

#: Optimizers whose exact map the replay follows (``torch.optim`` class names).
SUPPORTED = ("SGD", "Adam", "AdamW")


@dataclass(frozen=True)
class GroupSettings:
    """Hyperparameters of one parameter group (the learning rate comes from the schedule, per step)."""

    kind: str  # "sgd", "adam" or "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class OptimizerState:
    """The optimizer's state between two steps.

    Attributes:
        slots: per parameter, its state tensors in a fixed order: SGD with momentum ``[momentum_buffer]``
            (zeros before the buffer exists), Adam/AdamW ``[exp_avg, exp_avg_sq]``, plain SGD none.
        counts: per parameter, the steps it has taken (SGD: 0 means the buffer does not exist yet).
    """

    slots: tuple[tuple[torch.Tensor, ...], ...]
    counts: tuple[int, ...]

    def flat(self) -> list[torch.Tensor]:
        """Every slot tensor, parameter by parameter."""
        return [t for slot in self.slots for t in slot]

    def with_flat(self, tensors: Sequence[torch.Tensor], counts: tuple[int, ...] | None = None) -> OptimizerState:
        """The same structure holding ``tensors`` (as returned by :meth:`flat`)."""
        out, i = [], 0
        for slot in self.slots:
            out.append(tuple(tensors[i : i + len(slot)]))
            i += len(slot)
        return OptimizerState(tuple(out), self.counts if counts is None else counts)

    def detach(self) -> OptimizerState:
        """A copy cut from any autograd graph."""
        return self.with_flat([t.detach() for t in self.flat()])


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at exactly 0 is 0 rather than infinity (x >= 0)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class FunctionalOptimizer:
    """``torch.optim``'s update rules as a pure, differentiable function of (parameters, state, gradients).

    Args:
        settings: per trained parameter, its group's hyperparameters.
        groups: per trained parameter, the index of its parameter group (rates are given per group).
    """

    def __init__(self, settings: Sequence[GroupSettings], groups: Sequence[int]) -> None:
        self.settings = list(settings)
        self.groups = list(groups)
        self._scratches: dict[int, torch.Tensor] = {}

    def _scratch(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """A working buffer shaped like parameter ``i``, kept between in-place steps."""
        buffer = self._scratches.get(i)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._scratches[i] = torch.empty_like(like)
        return buffer

    @classmethod
    def from_torch(
        cls, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
    ) -> tuple[FunctionalOptimizer, OptimizerState]:
        """The functional form of ``optimizer`` over ``params`` and its current state (the run's initial state).

        Raises:
            ConfigError: an optimizer or option whose map is not modelled (amsgrad, maximize, other classes), or
                a parameter of ``params`` that the optimizer does not train.
        """
        name = type(optimizer).__name__
        if name not in SUPPORTED:
            raise ConfigError(f"the replay follows {', '.join(SUPPORTED)} exactly; {name} is not modelled")
        where = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        settings, groups, slots, counts = [], [], [], []
        for p in params:
            if id(p) not in where:
                raise ConfigError("a trained parameter is not in the optimizer's param_groups")
            gi = where[id(p)]
            s = _group_settings(name, optimizer.param_groups[gi])
            settings.append(s)
            groups.append(gi)
            slot, count = _initial_state(s, optimizer.state.get(p, {}), p)
            slots.append(slot)
            counts.append(count)
        return cls(settings, groups), OptimizerState(tuple(slots), tuple(counts))

    def step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        state: OptimizerState,
        lrs: Sequence[float],
    ) -> tuple[list[torch.Tensor], OptimizerState]:
        """One optimizer step, out of place (differentiable in every tensor argument).

        Args:
            params: the trained parameters before the step.
            grads: their gradients (None: the parameter got no gradient and, as in PyTorch, is not updated).
            state: the optimizer's state before the step.
            lrs: the learning rate of each parameter group at this step.

        Returns:
            the parameters after the step and the new state.
        """
        new_params, new_slots, new_counts = [], [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            slot, count = state.slots[i], state.counts[i]
            if g is None:
                new_params.append(p)
                new_slots.append(slot)
                new_counts.append(count)
                continue
            s, lr = self.settings[i], float(lrs[self.groups[i]])
            if s.kind == "sgd":
                p2, slot2 = _sgd(s, p, g, slot, count, lr)
            else:
                p2, slot2 = _adam(s, p, g, slot, count + 1, lr)
            new_params.append(p2)
            new_slots.append(slot2)
            new_counts.append(count + 1)
        return new_params, OptimizerState(tuple(new_slots), tuple(new_counts))

    def pull_back(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        state: OptimizerState,
        lrs: Sequence[float],
        lam: Sequence[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        """The transpose of :meth:`step`'s derivative, written out (docs/replay.md, "The optimizer's exact map").

        The same numbers as autograd through :meth:`step` (to round-off), without its graph: a handful of elementwise
        operations per parameter, most of them in place, instead of a recorded graph whose every node allocates
        (measured about twice as fast on a 1M-parameter MLP).

        Args:
            params, grads, state, lrs: the step's inputs, as for :meth:`step` (no graph needed).
            lam: per parameter then per slot (as :meth:`OptimizerState.flat`), (K, *shape) ``d J / d`` the state
                after the step; not modified.

        Returns:
            per parameter (K, *shape) ``d J / d theta`` through the update alone (the Hessian term is added by the
            caller), per slot ``d J / d slot``, and per parameter ``u = d J / d g`` (None where ``g`` is None).
        """
        P = len(params)
        lam_p, lam_s = list(lam[:P]), list(lam[P:])
        out_p: list[torch.Tensor] = []
        out_s: list[torch.Tensor] = []
        out_u: list[torch.Tensor | None] = []
        at = 0
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                slot, count = state.slots[i], state.counts[i]
                ls = lam_s[at : at + len(slot)]
                at += len(slot)
                if g is None:  # not updated: the sensitivities pass through unchanged
                    out_p.append(lam_p[i])
                    out_s.extend(ls)
                    out_u.append(None)
                    continue
                s, lr = self.settings[i], float(lrs[self.groups[i]])
                if s.kind == "sgd":
                    lp, lslot, u = _sgd_pull_back(s, lam_p[i], ls, count, lr)
                else:
                    lp, lslot, u = _adam_pull_back(s, p, g, slot, count + 1, lr, lam_p[i], ls)
                out_p.append(lp)
                out_s.extend(lslot)
                out_u.append(u)
        return out_p, out_s, out_u

    def step_no_grad(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        state: OptimizerState,
        lrs: Sequence[float],
    ) -> tuple[list[torch.Tensor], OptimizerState]:
        """:meth:`step`'s values without a graph, on copies (the inputs are not modified)."""
        copies = [p.clone() if g is not None else p for p, g in zip(params, grads, strict=True)]
        slots = [
            tuple(t.clone() for t in slot) if g is not None else slot
            for slot, g in zip(state.slots, grads, strict=True)
        ]
        return copies, self.step_in_place(copies, grads, OptimizerState(tuple(slots), state.counts), lrs)

    def step_in_place(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        state: OptimizerState,
        lrs: Sequence[float],
    ) -> OptimizerState:
        """:meth:`step`'s values without a graph, written into ``params`` and ``state``'s tensors as torch.optim's
        single-tensor code writes them (same operations in the same order); the state after the step (SGD's first
        momentum buffer is a new tensor)."""
        new_slots, new_counts = [], []
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                slot, count = state.slots[i], state.counts[i]
                if g is not None:
                    s, lr = self.settings[i], float(lrs[self.groups[i]])
                    if s.kind == "sgd":
                        slot = _sgd_in_place(s, p, g, slot, count, lr)
                    else:
                        slot = _adam_in_place(s, p, g, slot, count, lr, self._scratch(i, p))
                    count += 1
                new_slots.append(slot)
                new_counts.append(count)
        return OptimizerState(tuple(new_slots), tuple(new_counts))


def _sgd_in_place(
    s: GroupSettings, p: torch.Tensor, g: torch.Tensor, slot: tuple[torch.Tensor, ...], count: int, lr: float
) -> tuple[torch.Tensor, ...]:
    d_p = g.add(p, alpha=s.weight_decay) if s.weight_decay != 0 else g
    if s.momentum == 0:
        p.add_(d_p, alpha=-lr)
        return ()
    buf = d_p.clone() if count == 0 else slot[0].mul_(s.momentum).add_(d_p, alpha=1 - s.dampening)
    d_p = d_p.add(buf, alpha=s.momentum) if s.nesterov else buf
    p.add_(d_p, alpha=-lr)
    return (buf,)


def _adam_in_place(
    s: GroupSettings,
    p: torch.Tensor,
    g: torch.Tensor,
    slot: tuple[torch.Tensor, ...],
    count: int,
    lr: float,
    scratch: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    step = count + 1
    if s.kind == "adamw":
        p.mul_(1 - lr * s.weight_decay)
    elif s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)
    exp_avg = slot[0].lerp_(g, 1 - s.beta1)
    exp_avg_sq = slot[1].mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
    # torch.optim's (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), written into a buffer kept between steps:
    # the same operations, without a fresh allocation per step (whose first touch costs as much as the step).
    denom = torch.sqrt(exp_avg_sq, out=scratch).div_((1 - s.beta2**step) ** 0.5).add_(s.eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - s.beta1**step))
    return (exp_avg, exp_avg_sq)


def _group_settings(name: str, group: dict[str, Any]) -> GroupSettings:
    if group.get("maximize", False):
        raise ConfigError("maximize=True is not modelled by the replay (its map is the same with the sign flipped)")
    if group.get("amsgrad", False):
        raise ConfigError("amsgrad=True is not modelled by the replay: max(v_max, v) has no first-order map")
    wd = float(group.get("weight_decay", 0.0))
    if name == "SGD":
        return GroupSettings(
            "sgd",
            weight_decay=wd,
            momentum=float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)),
            nesterov=bool(group.get("nesterov", False)),
        )
    if group.get("decoupled_weight_decay", False):
        name = "AdamW"
    b1, b2 = group["betas"]
    kind = "adamw" if name == "AdamW" else "adam"
    return GroupSettings(kind, weight_decay=wd, beta1=float(b1), beta2=float(b2), eps=float(group["eps"]))


def _initial_state(s: GroupSettings, state: dict[str, Any], p: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int]:
    """A parameter's slots and step count from ``optimizer.state[p]`` (empty before the first step)."""
    zeros = torch.zeros_like(p.detach())
    if s.kind == "sgd":
        if s.momentum == 0:
            return (), 0
        buf = state.get("momentum_buffer")
        return ((zeros,), 0) if buf is None else ((buf.detach().clone(),), 1)
    if not state:
        return (zeros, zeros.clone()), 0
    step = state["step"]
    count = int(step.item() if isinstance(step, torch.Tensor) else step)
    return (state["exp_avg"].detach().clone(), state["exp_avg_sq"].detach().clone()), count


def _sgd(
    s: GroupSettings, p: torch.Tensor, g: torch.Tensor, slot: tuple[torch.Tensor, ...], count: int, lr: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``torch.optim.SGD``'s single-tensor update."""
    d_p = g + s.weight_decay * p if s.weight_decay != 0 else g
    if s.momentum == 0:
        return p - lr * d_p, ()
    # The buffer is the first step's d_p itself (no dampening), then mu buf + (1 - dampening) d_p.
    buf = d_p if count == 0 else slot[0] * s.momentum + (1 - s.dampening) * d_p
    d_p = d_p + s.momentum * buf if s.nesterov else buf
    return p - lr * d_p, (buf,)


def _adam(
    s: GroupSettings, p: torch.Tensor, g: torch.Tensor, slot: tuple[torch.Tensor, ...], step: int, lr: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``torch.optim.Adam``/``AdamW``'s single-tensor update (``step`` counted after this step)."""
    if s.kind == "adamw":
        p = p * (1 - lr * s.weight_decay)
    elif s.weight_decay != 0:
        g = g + s.weight_decay * p
    exp_avg = torch.lerp(slot[0], g, 1 - s.beta1)
    exp_avg_sq = torch.addcmul(slot[1] * s.beta2, g, g, value=1 - s.beta2)
    bias_correction1 = 1 - s.beta1**step
    bias_correction2_sqrt = (1 - s.beta2**step) ** 0.5
    denom = _safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + s.eps
    return torch.addcdiv(p, exp_avg, denom, value=-lr / bias_correction1), (exp_avg, exp_avg_sq)


def _sgd_pull_back(
    s: GroupSettings, lt: torch.Tensor, ls: Sequence[torch.Tensor], count: int, lr: float
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """:func:`_sgd`'s transpose: ``(a_theta, [a_buffer], u)`` from ``lt`` (K, *shape) and the buffer's ``ls``."""
    slots: list[torch.Tensor] = []
    if s.momentum == 0:
        u = lt * -lr
    else:
        lb = torch.add(ls[0], lt, alpha=-lr * (s.momentum if s.nesterov else 1.0))  # d J / d b'
        u = lb if count == 0 else lb * (1 - s.dampening)
        if s.nesterov:
            u = u.add_(lt, alpha=-lr)
        # Before its first step the buffer does not exist (its zeros do not reach the update).
        slots = [torch.zeros_like(lb) if count == 0 else lb.mul_(s.momentum)]
    a_theta = torch.add(lt, u, alpha=s.weight_decay) if s.weight_decay != 0 else lt
    return a_theta, slots, u


def _adam_pull_back(
    s: GroupSettings,
    p: torch.Tensor,
    g: torch.Tensor,
    slot: tuple[torch.Tensor, ...],
    step: int,
    lr: float,
    lt: torch.Tensor,
    ls: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """:func:`_adam`'s transpose (``step`` counted after this step): ``(a_theta, [a_m, a_v], u)``, K-batched."""
    if s.kind == "adam" and s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)  # gamma, the gradient Adam sees
    m2 = torch.lerp(slot[0], g, 1 - s.beta1)
    v2 = torch.addcmul(slot[1] * s.beta2, g, g, value=1 - s.beta2)
    bias_correction1 = 1 - s.beta1**step
    bias_correction2_sqrt = (1 - s.beta2**step) ** 0.5
    root = v2.sqrt_()
    denom = root / bias_correction2_sqrt + s.eps
    alpha = denom.reciprocal().mul_(lr / bias_correction1)  # -d theta' / d m'
    # d theta' / d v' = lr m' / (bias_correction1 denom^2 2 root bias_correction2_sqrt), 0 where v' = 0 (the
    # derivative of sqrt taken as 0 there, as _safe_sqrt does): dividing by infinity gives that 0.
    sigma = alpha * m2
    sigma.div_(denom).div_(root.masked_fill_(root == 0, float("inf"))).mul_(0.5 / bias_correction2_sqrt)
    mu = torch.addcmul(ls[0], lt, alpha, value=-1)  # d J / d m'
    rho = torch.addcmul(ls[1], lt, sigma)  # d J / d v'
    u = torch.addcmul(mu * (1 - s.beta1), rho, g, value=2 * (1 - s.beta2))
    if s.kind == "adamw":
        a_theta = lt * (1 - lr * s.weight_decay)
    else:
        a_theta = torch.add(lt, u, alpha=s.weight_decay) if s.weight_decay != 0 else lt
    return a_theta, [mu.mul_(s.beta1), rho.mul_(s.beta2)], u
