"""dvemb: data value embeddings for PyTorch training runs.

Record projected per-example gradients with :class:`Recorder`, read them back with
:func:`open_log`. See docs/format.md for the log format.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvemb.errors import (
        ChecksumError,
        ConfigError,
        DvembError,
        HeaderMismatchError,
        LogFormatError,
        LogVersionError,
        NonFiniteValueError,
        NotSafetensorsError,
        NumericalError,
        RecorderError,
        StepContinuityError,
        TruncatedFileError,
    )
    from dvemb.logformat import FORMAT_VERSION
    from dvemb.optim import DvembWarning
    from dvemb.projection import LayerProjection
    from dvemb.reader import GradientLog, LayerInfo, QuerySet, ShardData, open_log
    from dvemb.recorder import DEFAULT_PROJ_DIM, Recorder
    from dvemb.testgrad import project_model_gradient

# Attributes are imported on first use (PEP 562): `import dvemb.formats` (the API server) and `dvemb --help`
# must not pay for torch.
_LAZY = {
    **dict.fromkeys(
        [
            "ChecksumError",
            "ConfigError",
            "DvembError",
            "HeaderMismatchError",
            "LogFormatError",
            "LogVersionError",
            "NonFiniteValueError",
            "NotSafetensorsError",
            "NumericalError",
            "RecorderError",
            "StepContinuityError",
            "TruncatedFileError",
        ],
        "dvemb.errors",
    ),
    "FORMAT_VERSION": "dvemb.logformat",
    "DvembWarning": "dvemb.optim",
    "LayerProjection": "dvemb.projection",
    **dict.fromkeys(["GradientLog", "LayerInfo", "QuerySet", "ShardData", "open_log"], "dvemb.reader"),
    **dict.fromkeys(["DEFAULT_PROJ_DIM", "Recorder"], "dvemb.recorder"),
    "project_model_gradient": "dvemb.testgrad",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dvemb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PROJ_DIM",
    "FORMAT_VERSION",
    "ChecksumError",
    "ConfigError",
    "DvembError",
    "DvembWarning",
    "GradientLog",
    "HeaderMismatchError",
    "LayerInfo",
    "LayerProjection",
    "LogFormatError",
    "LogVersionError",
    "NonFiniteValueError",
    "NotSafetensorsError",
    "NumericalError",
    "QuerySet",
    "Recorder",
    "RecorderError",
    "ShardData",
    "StepContinuityError",
    "TruncatedFileError",
    "__version__",
    "open_log",
    "project_model_gradient",
]
