"""dvemb: data value embeddings for PyTorch training runs.

Record projected per-example gradients with :class:`Recorder`, read them back with
:func:`open_log`. See docs/format.md for the log format.
"""

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
