"""Example ids as users give them: ints or strings, in a list, a tensor or an array."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dvemb import logformat as fmt
from dvemb.errors import ConfigError, RecorderError
from dvemb.formats import repeated_in_step

__all__ = ["as_id_list", "check_unique"]


def as_id_list(ids: Any) -> list[int] | list[str]:
    """``ids`` as a list of Python ints or strings (one type: the log's id codec holds one).

    Raises:
        ConfigError: float ids, or ints mixed with strings.
    """
    if isinstance(ids, torch.Tensor | np.ndarray):
        if ids.dtype.is_floating_point if isinstance(ids, torch.Tensor) else ids.dtype.kind == "f":
            raise ConfigError("example ids must be integers or strings, not floats")
        return [int(i) for i in ids.tolist()]
    out = [i.item() if isinstance(i, np.generic) else i for i in ids]
    fmt.encode_ids(out)  # raises a ConfigError on mixed types
    return out


def check_unique(ids: Sequence[Any], step: int) -> None:
    """A step's rows are its distinct examples: the reader refuses a log with an id twice in one step.

    Raises:
        RecorderError: an id of step ``step`` is given twice (the first one repeated is named).
    """
    seen: set[Any] = set()
    for twice in ids:
        if twice not in seen:
            seen.add(twice)
            continue
        raise RecorderError(repeated_in_step(twice, step))
