"""Naive references for the core tests: per-example gradients and Gauss-Newton matrices built
with torch.func, laid out as dvemb stores them (weight matrix (out, in) with the bias as last column)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

LossOfOutputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def layer_matrix(model: nn.Module, layer: str, per_param: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, out, in[+1]) gradient matrices of one layer from per-parameter tensors with a leading N."""
    module = model.get_submodule(layer)
    weight = per_param[f"{layer}.weight"]
    weight = (
        weight.flatten(2) if weight.dim() > 3 else weight
    )  # conv (N, C_out, C_in, kh, kw) -> (N, C_out, C_in*kh*kw)
    if getattr(module, "bias", None) is not None:
        weight = torch.cat([weight, per_param[f"{layer}.bias"].unsqueeze(-1)], dim=-1)
    return weight


def per_example_grads(
    model: nn.Module, loss: LossOfOutputs, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``loss(model(x_i), y_i)``, {param name: (N, *shape)}."""
    params = _params(model)

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)  # type: ignore[no-any-return]


def ce_mean_over_positions(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Scalar loss of a batch of one: cross-entropy, averaged over positions for sequences."""
    return torch.nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def per_example_ggn(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Per-example Gauss-Newton blocks of one layer for softmax cross-entropy, (N, D, D).

    For (C,) logits: ``J^T (diag p - p p^T) J``; for (L, V) logits the per-example loss is the mean
    over positions, so ``(1/L) sum_t J_t^T H_t J_t``.
    """
    params = _params(model)
    names = [n for n in params if n.startswith(f"{layer}.")]

    def logits_of(p_layer: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **p_layer}, (xi.unsqueeze(0),))[0]

    blocks = []
    for xi in x:
        layer_params = {n: params[n] for n in names}
        logits = logits_of(layer_params, xi).detach()
        num_classes = logits.shape[-1]
        logits = logits.reshape(-1, num_classes)  # (L, V); L = 1 for classification
        positions = logits.shape[0]
        jac = jacrev(logits_of)(layer_params, xi)  # {name: (*logit_shape, *param_shape)}
        rows = {n: j.reshape(positions * num_classes, *params[n].shape) for n, j in jac.items()}
        J = layer_matrix(model, layer, rows).reshape(positions, num_classes, -1)  # (L, V, D)
        p = torch.softmax(logits, dim=-1)  # (L, V)
        H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (L, V, V)
        blocks.append(torch.einsum("lvd,lvw,lwe->de", J, H, J) / positions)
    return torch.stack(blocks)


def batch_removed(grads: torch.Tensor) -> torch.Tensor:
    """(B, d) per-example gradients of one step -> (B, d) gradient changes, in units of ``-1/B``, when each
    example leaves its mean-reduced batch: ``B/(B-1) (g_z - mean g)`` (a batch of one: ``g_z``), so that
    ``-(rate = 1/B) * row`` is ``-(g_z - g_B)/(B - 1)``, what the engine's ``removal="batch"`` models."""
    count = grads.shape[0]
    if count == 1:
        return grads
    return count / (count - 1) * (grads - grads.mean(0, keepdim=True))
