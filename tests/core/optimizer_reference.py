"""Naive reference for optimizer-exact influence: push one example's removal forward through every
later step of the linearised optimizer, written from PyTorch's own update rules (SGD with momentum,
Adam, AdamW), with the curvature rows and preconditioners the log holds. Obvious rather than fast:
one forward pass per occurrence, full dimension, float64."""

from __future__ import annotations

from collections.abc import Callable

import torch
from reference import batch_removed

import dvemb
from dvemb import logformat as fmt


def _steps(log: dvemb.GradientLog) -> list[dict[str, object]]:
    """Everything about each step, in order: rows, hyperparameters, preconditioner per layer."""
    out: list[dict[str, object]] = []
    for shard in log.iter_shards():
        for j, step in enumerate(shard.steps.tolist()):
            rows = shard.row_step == step
            entry: dict[str, object] = {
                "step": step,
                "batch": int(shard.batch_size[j]),
                "lr": shard.lr[j].tolist(),
                "wd": shard.weight_decay[j].tolist(),
                "grads": {n: g[rows].double() for n, g in shard.grads.items()},
                "curv": {n: c[rows].double().flatten(0, 1) for n, c in shard.curvature.items()},
                "opt": {k: v[j] for k, v in shard.optimizer.items()},
            }
            out.append(entry)
    return out


Preconditioner = Callable[[int], torch.Tensor]


def removal_effects(
    log_dir: object,
    layers: list[str] | None = None,
    *,
    second_moment: bool = True,
    preconditioner: Preconditioner | None = None,
    lift: torch.Tensor | None = None,
    lift_in: Preconditioner | None = None,
) -> list[torch.Tensor]:
    """Per step, (B, D) change of the final parameters (tracked layers concatenated, or those
    of ``layers`` only) when each of the step's examples is removed from that one step.

    Curvature is per layer block when ``layers`` has one name, else over the concatenated vector.
    ``second_moment``: under Adam, also follow the change of the second moment ``v``.
    ``preconditioner``: under Adam, step index -> (D, D) matrix used instead of the recorded diagonal.
    ``lift``: (N, D) the bases of a projected layer (``kron(P_out, P_in)``), with ``lift_in``: step index -> (N, D)
    the reconstruction of a projected gradient change in the layer's coordinates: the second moment's change is
    followed over its N own coordinates, ``dv += nu * (L_k dgamma)`` and ``dtheta += P^T (sigma * dv)``, and so is
    the first moment, ``dm = beta1 dm + (1 - beta1) L_k dgamma`` and ``dtheta -= a P^T (D * dm)`` (D recorded whole).
    """
    log = dvemb.open_log(log_dir)
    optimizer = log.manifest["optimizer"]
    kind, nesterov = optimizer["type"], bool(optimizer.get("nesterov", False))
    names = layers or [layer.name for layer in log.layers]
    index = [next(i for i, layer in enumerate(log.layers) if layer.name == n) for n in names]
    steps = _steps(log)
    mean = log.loss_reduction == "mean"
    effects = []
    for s, first in enumerate(steps):
        rows = []
        grads_s = torch.cat([first["grads"][n] for n in names], 1)  # type: ignore[index]
        if mean:  # the engine's default removal: the example leaves its batch, whose mean is over the others
            grads_s = batch_removed(grads_s)
        for g in grads_s:
            ggn = log.curvature_mode == "ggn"
            rows.append(
                _push(
                    steps, s, g, names, index, kind, nesterov, mean, ggn, second_moment, preconditioner, lift, lift_in
                )
            )
        effects.append(torch.stack(rows))
    return effects


def _push(
    steps: list[dict[str, object]],
    s: int,
    g: torch.Tensor,
    names: list[str],
    index: list[int],
    kind: str,
    nesterov: bool,
    mean: bool,
    ggn: bool,
    second_moment: bool,
    preconditioner: Preconditioner | None = None,
    lift: torch.Tensor | None = None,
    lift_in: Preconditioner | None = None,
) -> torch.Tensor:
    i0 = index[0]  # the tests give every layer the same hyperparameters
    d_theta = torch.zeros_like(g)
    own_size = g.shape[0] if lift is None else lift.shape[0]  # a lifted layer's moments live in its own coordinates
    d_buf = torch.zeros_like(g) if lift is None or kind == "SGD" else torch.zeros(own_size, dtype=g.dtype)
    d_v = torch.zeros_like(g) if lift is None else torch.zeros(own_size, dtype=g.dtype)
    for k in range(s, len(steps)):
        st = steps[k]
        w = 1.0 / st["batch"] if mean else 1.0  # type: ignore[operator]
        lr, wd = st["lr"][i0], st["wd"][i0]  # type: ignore[index]
        opt = st["opt"]  # type: ignore[assignment]
        rows = torch.cat([(st["curv"] if ggn else st["grads"])[n] for n in names], 1)  # type: ignore[index]
        # d(batch gradient): the Hessian (curvature rows) acting on d_theta; the removal at step s.
        d_grad = w * rows.T @ (rows @ d_theta)
        if k == s:
            d_grad = d_grad - w * g
        if kind == "SGD":
            momentum, dampening = float(opt["opt.momentum"][i0]), float(opt["opt.dampening"][i0])
            d_p = d_grad + wd * d_theta
            fresh = int(opt["opt.step"][i0]) == 1  # the buffer is created from this step's gradient
            d_buf = d_p.clone() if fresh else momentum * d_buf + (1 - dampening) * d_p
            d_p = d_p + momentum * d_buf if nesterov else d_buf
            d_theta = d_theta - lr * d_p
        else:  # Adam, AdamW
            beta1, beta2 = float(opt["opt.momentum"][i0]), float(opt["opt.beta2"][i0])
            count = float(opt["opt.step"][i0])

            def state(what: str, opt: dict[str, torch.Tensor] = opt) -> torch.Tensor:  # type: ignore[assignment]
                return torch.cat([opt[fmt.optimizer_layer_key(what, n)].double() for n in names])

            if kind == "AdamW":
                d_theta = d_theta * (1 - lr * wd)
            else:
                d_grad = d_grad + wd * d_theta
            # m = beta1 m + (1 - beta1) grad;  v = beta2 v + (1 - beta2) grad^2;  p -= lr m_hat / (sqrt(v_hat) + eps)
            own = d_grad if lift_in is None else lift_in(k) @ d_grad  # the gradient's change in the layer's coordinates
            d_v = beta2 * d_v + 2 * (1 - beta2) * state("batch_grad") * own
            if lift is not None:  # both moments over the layer's own coordinates, the exact preconditioner
                d_buf = beta1 * d_buf + (1 - beta1) * own
                step_d = lift.T @ (state("precond") * d_buf)
            else:
                d_buf = beta1 * d_buf + (1 - beta1) * d_grad
                step_d = state("precond") * d_buf if preconditioner is None else preconditioner(k) @ d_buf
            d_theta = d_theta - lr / (1 - beta1**count) * step_d
            if second_moment:
                change = lr * state("vsens") * d_v
                d_theta = d_theta + (change if lift is None else lift.T @ change)
    return d_theta
