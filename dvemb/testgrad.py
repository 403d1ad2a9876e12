"""Project a model's ordinary gradient into a log's space.

This is the client side of ad-hoc queries: compute ``loss.backward()`` for one test example at
the final model, then ``project_model_gradient(dvemb.open_log(dir), model)`` gives the same vectors
the recorder stores for query sets, ready to score against the run. A random projection is rebuilt
from the manifest alone; a calibrated one needs the log (its ``projection.safetensors``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dvemb.errors import ConfigError
from dvemb.reader import GradientLog, LayerInfo, layers_from_manifest

__all__ = ["project_model_gradient"]


def _gradient_matrix(layer: LayerInfo, module: nn.Module) -> torch.Tensor:
    """(out_dim, in_dim) weight-gradient matrix with the bias gradient as the last column."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.grad is None:
        raise ConfigError(f"layer {layer.name!r} has no .grad; call loss.backward() for the test example first")
    grad = weight.grad.detach().reshape(weight.shape[0], -1)  # conv (C_out, C_in, kh, kw) -> (C_out, C_in*kh*kw)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        if bias.grad is None:
            raise ConfigError(f"layer {layer.name!r} has no bias .grad; call loss.backward() first")
        grad = torch.cat([grad, bias.grad.detach().unsqueeze(1)], dim=1)
    return grad


def project_model_gradient(log: GradientLog | dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Project the gradients in ``model``'s parameters' ``.grad`` as the log's recorder would.

    Args:
        log: the log (``dvemb.open_log(dir)``), or its ``manifest.json`` as a dict when the
            projection is the random one.
        model: the trained model, after ``loss.backward()`` of one test example's loss.

    Returns:
        layer name -> (d_l,) projected gradient.
    """
    if isinstance(log, GradientLog):
        layers = log.layers
    elif log.get("projection_files"):
        raise ConfigError("this log's projection is calibrated: pass dvemb.open_log(log_dir), not its manifest")
    else:
        layers = layers_from_manifest(log)
    modules = dict(model.named_modules())
    projected = {}
    for layer in layers:
        module = modules.get(layer.name)
        if module is None:
            raise ConfigError(f"the model has no module {layer.name!r}, which the log tracks; pass the recorded model")
        matrix = _gradient_matrix(layer, module)
        p = layer.projection
        if tuple(matrix.shape) != (p.out_dim, p.in_dim):
            raise ConfigError(
                f"layer {layer.name!r} has gradient shape {tuple(matrix.shape)}, the log expects "
                f"({p.out_dim}, {p.in_dim}); pass the recorded model"
            )
        projected[layer.name] = p.project_matrix(matrix)
    return projected
