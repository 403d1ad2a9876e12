"""What the recorder reads from a PyTorch optimizer at every step: per-layer learning rate and weight
decay, and what the engine's optimizer-exact propagation needs (docs/optimizers.md).

Propagations, by optimizer:

- ``sgd``: plain SGD (the paper's method, exact to first order).
- ``momentum``: SGD with momentum (dampening, Nesterov, L2 weight decay).
- ``adam`` / ``adamw``: Adam with L2 weight decay, AdamW with decoupled weight decay (bias
  corrections and eps included; amsgrad is not modelled).
- ``proxy``: anything else (Lion, NAdam, RMSprop, amsgrad, maximize, ...): the SGD proxy.

Per step and tracked layer the recorder keeps the scalars of the linearised update (momentum or
beta1, dampening, beta2, eps, the optimizer's step count) and, for Adam, the bias-corrected second
moment: whole (as the preconditioner ``1 / (sqrt(v_hat) + eps)``, with the sensitivity of the update
to ``v`` and the step's gradient for the second-moment term) for a layer stored without
projection, or as its row and column sums (an Adafactor factorisation, ``n_out + n_in`` values)
for a projected layer. For the lifted moments of a projected layer of at most :data:`LIFTED_SECOND_MOMENT_MAX`
coordinates: the sensitivity, the step's gradient and the preconditioner themselves (``3 n_out n_in`` values);
for a larger one, on request, the top singular pairs of the first two (:mod:`dvemb.low_rank`). Never a copy of
the optimizer state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from dvemb import logformat as fmt
from dvemb.low_rank import low_rank_factors

__all__ = [
    "LIFTED_SECOND_MOMENT_MAX",
    "PROPAGATIONS",
    "DvembWarning",
    "OptimizerInfo",
    "TrackedParameters",
    "describe_optimizer",
]

#: A projected layer with at most this many coordinates (out_dim x in_dim) keeps, per Adam step, the
#: sensitivity of the update to the second moment, the step's gradient and the preconditioner whole (three
#: gradient-sized tensors), so that ``compute(second_moment_lifted=True)`` can carry both moments in the layer's
#: own coordinates (docs/optimizers.md, section 3): about six 256-dimensional gradient rows for a 128 x 128 layer.
LIFTED_SECOND_MOMENT_MAX = 16384

#: Every propagation the engine knows, with the label results show for it.
PROPAGATIONS = {
    "sgd": "exact SGD",
    "momentum": "SGD with momentum",
    "adam": "Adam",
    "adamw": "AdamW",
    "proxy": "SGD proxy",
}


class DvembWarning(UserWarning):
    """A result will be less exact than it could be (for example the SGD proxy for Lion)."""


_DECOUPLED = {"AdamW"}
_HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "alpha", "amsgrad")


@dataclass(frozen=True)
class TrackedParameters:
    """The parameters behind one tracked layer's gradient matrix (out_dim, in_dim).

    Attributes:
        weight: the weight; its gradient reshaped to (out_dim, -1) gives the matrix's first columns.
        bias: the bias (the matrix's last column), or None.
        out_dim: rows of the gradient matrix.
        whole: True when the layer is stored without projection (the preconditioner is kept exactly).
        size: coordinates of the gradient matrix (out_dim x in_dim).
        transpose: True when the weight is stored (in, out), as ``transformers``' Conv1D.
    """

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    out_dim: int
    whole: bool
    transpose: bool = False

    @property
    def size(self) -> int:
        """Coordinates of the gradient matrix, bias column included."""
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())

    @property
    def lifted(self) -> bool:
        """True for a projected layer whose second-moment term is kept in its own coordinates."""
        return not self.whole and self.size <= LIFTED_SECOND_MOMENT_MAX


def _as_gradient_matrix(t: TrackedParameters, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A per-parameter tensor (gradient, Adam moment) of a layer laid out as its gradient matrix
    (out_dim, in_dim), bias column last, detached, float32 or wider."""
    weight = weight.T if (t.transpose and weight.dim() == 2) else weight
    matrix = weight.reshape(t.out_dim, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(t.out_dim, 1)], dim=1)
    return matrix.detach().to(torch.promote_types(matrix.dtype, torch.float32))


def _classify(optimizer: torch.optim.Optimizer) -> tuple[str, str | None]:
    """(propagation, reason when it is the proxy)."""
    kind = type(optimizer)
    groups = optimizer.param_groups
    if any(g.get("maximize", False) for g in groups):
        return "proxy", "maximize=True is not modelled"
    if kind is torch.optim.SGD:
        if all(g.get("momentum", 0) == 0 and not g.get("nesterov", False) for g in groups):
            return "sgd", None
        return "momentum", None
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        if any(g.get("amsgrad", False) for g in groups):
            return "proxy", "amsgrad=True is not modelled (its running maximum of v has no first-order map here)"
        if kind is torch.optim.Adam and any(g.get("decoupled_weight_decay", False) for g in groups):
            return "adamw", None
        return ("adamw" if kind is torch.optim.AdamW else "adam"), None
    return "proxy", f"{kind.__name__} has no optimizer-exact propagation in dvemb yet"


class OptimizerInfo:
    """Reads an optimizer's per-layer hyperparameters and state at each step.

    Args:
        optimizer: the user's optimizer.
        tracked: for each tracked layer, its parameters.
        second_moment_rank: singular pairs of Adam's second-moment sensitivity and of the step's gradient kept
            per projected layer and step (0: none, the term is then left out for projected layers).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, tracked: list[TrackedParameters], *, second_moment_rank: int = 0
    ) -> None:
        self.optimizer = optimizer
        self.second_moment_rank = second_moment_rank
        self.tracked = tracked
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [i for i, t in enumerate(tracked) if id(t.weight) not in group_of]
        if missing:
            raise ValueError(f"the optimizer does not update tracked layer(s) {missing}")
        self.layer_groups = [group_of[id(t.weight)] for t in tracked]
        self.type = type(optimizer).__name__
        self.propagation, self.proxy_reason = _classify(optimizer)
        self.exact_sgd = self.propagation == "sgd"
        self.snapshot: tuple[list[float], list[float]] | None = None
        self.step_state: dict[str, torch.Tensor] | None = None
        self._fresh: list[bool] = []
        self._batch_grads: list[torch.Tensor | None] = []
        self._sgd_steps = [0] * len(tracked)
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The rates that optimizer.step() is about to apply, whatever a scheduler does afterwards.
        self.snapshot = self.read()
        if self.propagation == "momentum":
            state = optimizer.state
            self._fresh = [state.get(t.weight, {}).get("momentum_buffer") is None for t in self.tracked]
        if self.propagation in ("adam", "adamw"):
            self._batch_grads = [
                self._batch_gradient(i, t) if t.whole or t.lifted or self.second_moment_rank else None
                for i, t in enumerate(self.tracked)
            ]

    def _batch_gradient(self, index: int, t: TrackedParameters) -> torch.Tensor:
        """The gradient Adam's moments take in at this step, as the layer's flattened gradient matrix
        (with Adam's L2 term ``weight_decay * theta``): the second-moment term of the map needs it."""
        group = self.optimizer.param_groups[self.layer_groups[index]]
        l2 = 0.0 if self.propagation == "adamw" else float(group.get("weight_decay", 0.0))

        def gamma(p: torch.nn.Parameter) -> torch.Tensor:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            return (grad + l2 * p).detach() if l2 else grad.detach().clone()  # .grad may be zeroed in place

        return _as_gradient_matrix(t, gamma(t.weight), None if t.bias is None else gamma(t.bias)).flatten()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.propagation in ("momentum", "adam", "adamw"):
            self.step_state = self._read_state()

    def read(self) -> tuple[list[float], list[float]]:
        """(learning rate, weight decay) per tracked layer, as the optimizer holds them now."""
        groups = self.optimizer.param_groups
        lr = [float(groups[g]["lr"]) for g in self.layer_groups]
        weight_decay = [float(groups[g].get("weight_decay", 0.0)) for g in self.layer_groups]
        return lr, weight_decay

    def _read_state(self) -> dict[str, torch.Tensor]:
        """Per-layer scalars (``opt.*``, (n_layers,) float64) and Adam's second-moment tensors."""
        groups = [self.optimizer.param_groups[g] for g in self.layer_groups]
        n = len(self.tracked)
        out: dict[str, torch.Tensor] = {}
        if self.propagation == "momentum":
            for i, fresh in enumerate(self._fresh):
                self._sgd_steps[i] = 1 if fresh else self._sgd_steps[i] + 1
            out["opt.momentum"] = torch.tensor([float(g.get("momentum", 0.0)) for g in groups], dtype=torch.float64)
            out["opt.dampening"] = torch.tensor([float(g.get("dampening", 0.0)) for g in groups], dtype=torch.float64)
            out["opt.beta2"] = torch.zeros(n, dtype=torch.float64)
            out["opt.eps"] = torch.zeros(n, dtype=torch.float64)
            out["opt.step"] = torch.tensor(self._sgd_steps, dtype=torch.float64)
            return out
        state = self.optimizer.state
        steps = [float(state[t.weight]["step"]) for t in self.tracked]
        out["opt.momentum"] = torch.tensor([float(g["betas"][0]) for g in groups], dtype=torch.float64)
        out["opt.dampening"] = torch.zeros(n, dtype=torch.float64)
        out["opt.beta2"] = torch.tensor([float(g["betas"][1]) for g in groups], dtype=torch.float64)
        out["opt.eps"] = torch.tensor([float(g["eps"]) for g in groups], dtype=torch.float64)
        out["opt.step"] = torch.tensor(steps, dtype=torch.float64)
        for index, (t, g, step) in enumerate(zip(self.tracked, groups, steps, strict=True)):
            bc1, bc2 = 1.0 - float(g["betas"][0]) ** step, 1.0 - float(g["betas"][1]) ** step
            v_hat = self._moment(t, "exp_avg_sq") / bc2  # (out_dim, in_dim)
            if t.whole or t.lifted:
                precond, sensitivity = self._preconditioner(t, v_hat, g, bc1, bc2)
                out[f"opt.precond.{index}"] = precond.flatten()  # a lifted layer's first moment needs it too
                out[f"opt.vsens.{index}"] = sensitivity.flatten()
                batch_grad = self._batch_grads[index] if index < len(self._batch_grads) else None
                assert batch_grad is not None
                out[f"opt.batch_grad.{index}"] = batch_grad
            if not t.whole:
                out[f"opt.v_row.{index}"] = v_hat.sum(1)
                out[f"opt.v_col.{index}"] = v_hat.sum(0)
                if self.second_moment_rank and not t.lifted:
                    out.update(self._second_moment_factors(index, t, v_hat, g, bc1, bc2))
        return out

    def _preconditioner(
        self, t: TrackedParameters, v_hat: torch.Tensor, group: dict[str, Any], bc1: float, bc2: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_dim, in_dim) Adam's preconditioner ``1 / (sqrt(v_hat) + eps)`` and the sensitivity of the update
        to ``v`` divided by lr, ``d(update)/d(v) / lr`` (zero where ``v_hat`` is 0)."""
        root = v_hat.sqrt()
        precond = 1.0 / (root + float(group["eps"]))
        m_hat = self._moment(t, "exp_avg") / bc1
        sensitivity = m_hat * precond**2 / (2.0 * root.clamp_min(1e-300) * bc2)
        return precond, torch.where(root > 0, sensitivity, 0.0)

    def _second_moment_factors(
        self, index: int, t: TrackedParameters, v_hat: torch.Tensor, group: dict[str, Any], bc1: float, bc2: float
    ) -> dict[str, torch.Tensor]:
        """Top singular pairs of a projected layer's ``vsens`` and ``batch_grad`` matrices (docs/optimizers.md)."""
        _, sensitivity = self._preconditioner(t, v_hat, group, bc1, bc2)
        batch_grad = self._batch_grads[index]
        assert batch_grad is not None
        out = {}
        for (left_name, right_name), matrix in zip(
            fmt.SECOND_MOMENT_FACTORS, (sensitivity, batch_grad.view_as(v_hat)), strict=True
        ):
            left, right = low_rank_factors(matrix, self.second_moment_rank, seed=index)
            out[f"opt.{left_name}.{index}"], out[f"opt.{right_name}.{index}"] = left, right
        return out

    def _moment(self, t: TrackedParameters, key: str) -> torch.Tensor:
        """An Adam moment laid out as the layer's gradient matrix, bias column last, float32 or wider."""
        state = self.optimizer.state
        return _as_gradient_matrix(t, state[t.weight][key], None if t.bias is None else state[t.bias][key])

    def stepped(self) -> bool:
        """True when optimizer.step() ran since the values were last taken (a GradScaler may skip it)."""
        return self.snapshot is not None

    def take_step_values(
        self, *, require_step: bool = True
    ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
        """Values captured when optimizer.step() ran in this step (or the current ones if it did not).

        Args:
            require_step: raise when an optimizer with state (momentum, Adam) did not step.

        Returns:
            (learning rate per layer, weight decay per layer, optimizer-state tensors of the step).
        """
        values, self.snapshot = self.snapshot or self.read(), None
        state, self.step_state = self.step_state, None
        if require_step and state is None and self.propagation in ("momentum", "adam", "adamw"):
            raise RuntimeError("optimizer.step() did not run inside rec.step()")
        return values[0], values[1], state or {}

    def describe(self) -> dict[str, Any]:
        """Manifest entry: type, propagation, weight-decay mode and hyperparameters per group."""
        groups = [
            {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in g.items()
                if k in _HYPERPARAMETERS and isinstance(v, (int, float, bool, tuple))
            }
            for g in self.optimizer.param_groups
        ]
        decoupled = self.type in _DECOUPLED or self.propagation == "adamw"
        return {
            "type": self.type,
            "exact_sgd": self.exact_sgd,
            "propagation": self.propagation,
            "proxy_reason": self.proxy_reason,
            "nesterov": any(bool(g.get("nesterov", False)) for g in self.optimizer.param_groups),
            "weight_decay_mode": "decoupled" if decoupled else "l2",
            "param_groups": groups,
            "layer_groups": self.layer_groups,
        }

    def state_summary(self) -> dict[str, Any]:
        """Per-group means of the optimizer's state tensors (momentum, Adam moments), for the manifest."""
        summary: list[dict[str, float]] = []
        for group in self.optimizer.param_groups:
            sums: dict[str, list[float]] = {}
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
                        sums.setdefault(key, []).append(float(value.abs().mean()))
            summary.append({f"mean_abs_{k}": sum(v) / len(v) for k, v in sums.items()})
        return {"param_groups": summary}

    def remove(self) -> None:
        """Detach the step hooks."""
        for hook in self._hooks:
            hook.remove()


def describe_optimizer(info: OptimizerInfo) -> dict[str, Any]:
    """Manifest entry of an optimizer, warning once when influence will use the SGD proxy."""
    entry = info.describe()
    if info.propagation == "proxy":
        warnings.warn(
            f"{info.type} is recorded, but influence will use the SGD proxy (learning rate times gradient, as in "
            f"the paper) because {info.proxy_reason}; scores are approximate for this optimizer",
            DvembWarning,
            stacklevel=4,
        )
    return entry
