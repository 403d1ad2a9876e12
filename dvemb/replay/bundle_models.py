"""The models a replay bundle can describe, as data (JSON), and rebuild without the user's code.

- ``{"kind": "sequential", "layers": [...], "dtype": ...}``: a ``torch.nn.Sequential`` of ``Linear``, ``LayerNorm``,
  ``Flatten``, ``Identity`` and the activations ``Tanh``, ``ReLU``, ``GELU``, ``Sigmoid``, ``SiLU``;
- ``{"kind": "transformers", "task": "causal-lm" | "sequence-classification", "config": {...}, "dtype": ...}``: a
  Hugging Face model built from its config by ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``
  (no remote code; eager attention, whose kernels have a double backward).

Anything else is refused with the way out: replay on your side (``dvemb replay``) and upload the agreement.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from dvemb.errors import ConfigError

__all__ = ["build_model", "describe_model"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_TRANSFORMERS = "dvemb.integrations.hf_bundle_models"
_ELSEWHERE = "replay this run on your side (dvemb replay) and upload the agreement (dvemb upload-agreement)"


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The JSON description of ``model`` (module docstring).

    Raises:
        ConfigError: a model the service cannot rebuild.
    """
    dtype = _dtype_name(model)
    if isinstance(model, nn.Sequential):
        return {"kind": "sequential", "layers": [_layer(m) for m in model], "dtype": dtype}
    plugin = _transformers()
    task = plugin.task_of(model) if plugin is not None else None
    if task is not None:
        config: Any = getattr(model, "config", None)
        return {"kind": "transformers", "task": task, "config": config.to_dict(), "dtype": dtype}
    raise ConfigError(
        f"a {type(model).__name__} cannot be described for the service (a torch.nn.Sequential of common layers, or a "
        f"transformers model that AutoModelForCausalLM or AutoModelForSequenceClassification builds, can); {_ELSEWHERE}"
    )


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A fresh model of ``spec`` (weights to be loaded), in its dtype.

    Raises:
        ConfigError: an unknown kind, layer, task or dtype, or a config ``transformers`` refuses.
    """
    dtype = _DTYPES.get(spec.get("dtype", ""))
    if dtype is None:
        raise ConfigError(f"replay bundle: model dtype {spec.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    kind = spec.get("kind")
    if kind == "sequential":
        layers = spec.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ConfigError("replay bundle: a sequential model needs a list of layers")
        return nn.Sequential(*(_build_layer(layer) for layer in layers)).to(dtype)
    if kind == "transformers":
        return _transformers_model(spec).to(dtype)
    raise ConfigError(f"replay bundle: model kind {kind!r} is not 'sequential' or 'transformers'; {_ELSEWHERE}")


def _dtype_name(model: nn.Module) -> str:
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ConfigError("the model has no parameters")
    return str(first.dtype).removeprefix("torch.")


def _layer(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Linear):
        return {
            "type": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.LayerNorm):
        return {
            "type": "layer_norm",
            "normalized_shape": list(module.normalized_shape),
            "eps": module.eps,
            "elementwise_affine": module.elementwise_affine,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Flatten):
        return {"type": "flatten", "start_dim": module.start_dim, "end_dim": module.end_dim}
    if isinstance(module, nn.GELU):
        return {"type": "gelu", "approximate": module.approximate}
    name = next((n for n, cls in _ACTIVATIONS.items() if type(module) is cls), None)
    if name is None:
        raise ConfigError(
            f"layer {type(module).__name__} of the Sequential cannot be described for the service (Linear, "
            f"LayerNorm, Flatten, GELU, {', '.join(c.__name__ for c in _ACTIVATIONS.values())}); {_ELSEWHERE}"
        )
    return {"type": name}


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"replay bundle: {what} must be a non-negative integer, got {value!r}")
    return value


def _build_layer(layer: Any) -> nn.Module:
    if not isinstance(layer, dict):
        raise ConfigError(f"replay bundle: a layer is a JSON object, got {layer!r}")
    kind = layer.get("type")
    builders: dict[str, Callable[[], nn.Module]] = {
        "linear": lambda: nn.Linear(
            _int(layer.get("in_features"), "in_features"),
            _int(layer.get("out_features"), "out_features"),
            bias=bool(layer.get("bias", True)),
        ),
        "layer_norm": lambda: nn.LayerNorm(
            [_int(n, "normalized_shape") for n in layer.get("normalized_shape", [])],
            eps=float(layer.get("eps", 1e-5)),
            elementwise_affine=bool(layer.get("elementwise_affine", True)),
            bias=bool(layer.get("bias", True)),
        ),
        "flatten": lambda: nn.Flatten(int(layer.get("start_dim", 1)), int(layer.get("end_dim", -1))),
        "gelu": lambda: nn.GELU(approximate="tanh" if layer.get("approximate") == "tanh" else "none"),
        **{name: cls for name, cls in _ACTIVATIONS.items()},
    }
    if kind not in builders:
        raise ConfigError(f"replay bundle: layer type {kind!r} is not one of {', '.join(builders)}")
    return builders[kind]()


def _transformers() -> ModuleType | None:
    """The Hugging Face part (dvemb.integrations.hf_bundle_models), imported by name on use: the core never imports
    transformers; None where it is not installed."""
    try:
        return importlib.import_module(_TRANSFORMERS)
    except ImportError:
        return None


def _transformers_model(spec: dict[str, Any]) -> nn.Module:
    task, config = spec.get("task"), spec.get("config")
    plugin = _transformers()
    if plugin is None:
        raise ConfigError("replay bundle: this worker has no transformers (pip install 'dvemb[huggingface]')")
    if not isinstance(task, str) or not isinstance(config, dict):
        raise ConfigError("replay bundle: a transformers model needs a task and a config")
    model: nn.Module = plugin.build(task, config)
    return model
