"""Hugging Face models in a replay bundle (dvemb.replay.bundle_models): described by their config and rebuilt by
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` (no remote code; eager attention, whose kernels
have a double backward). The core reaches this module by name only when a bundle holds such a model, so that it
never imports transformers itself."""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from transformers.models.auto import modeling_auto

from dvemb.errors import ConfigError

__all__ = ["TASKS", "build", "task_of"]

#: The tasks a bundle names, and the auto class that builds each.
TASKS = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}
_MAPPINGS = {
    "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence-classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}


def task_of(model: nn.Module) -> str | None:
    """The task whose auto class builds exactly ``model``'s class from its config, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    model_type = str(getattr(config, "model_type", ""))
    return next((t for t, names in _MAPPINGS.items() if names.get(model_type) == type(model).__name__), None)


def build(task: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of ``task`` from its config dict (``model_type`` included).

    Raises:
        ConfigError: an unknown task, or a config transformers refuses.
    """
    if task not in TASKS or not isinstance(config.get("model_type"), str):
        raise ConfigError(
            f"replay bundle: a transformers model needs a task ({', '.join(TASKS)}) and a config with its model_type"
        )
    settings = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        built = transformers.AutoConfig.for_model(config["model_type"], **settings)
        model: nn.Module = getattr(transformers, TASKS[task]).from_config(built, attn_implementation="eager")
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"replay bundle: transformers cannot build this model: {error}") from error
    return model
