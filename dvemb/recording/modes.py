"""The recorder's modes as string enums.

Users pass the modes as strings (``Recorder(model, dir, curvature="ggn")``) and keep doing so: every enum here
is a :class:`enum.StrEnum`, so a member is equal to its string, prints as it, and is written to the manifest as
it. :func:`choose` turns what a user passed into a member, or raises the :class:`~dvemb.errors.ConfigError`
that names the option and the strings it accepts. Members are declared in the order the error lists them.

- :class:`CurvatureMode`: ``curvature=``, how the recursion's curvature is estimated.
- :class:`CurvatureLoss`: ``curvature_loss=``, the loss at the model's output that Gauss-Newton rows model.
- :class:`LossReduction`: ``loss_reduction=``, how a step's gradient relates to its examples' gradients.
- :class:`ProjectionMode`: ``projection=``, where the projection bases come from.
- :class:`StorageDtype`: ``dtype=``, the storage dtype of the log (:data:`dvemb.logformat.STORAGE_DTYPES`).
- :class:`PositionReduction`: ``rec.curvature(position_reduction=)``, a sequence example's loss over positions.
- :class:`Capture`: what the layer hooks are capturing right now (internal).
- :class:`BasisSource`: where fitted bases were fitted (the manifest's ``projection.calibration.source``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from dvemb.errors import ConfigError

__all__ = [
    "BasisSource",
    "Capture",
    "CurvatureLoss",
    "CurvatureMode",
    "LossReduction",
    "PositionReduction",
    "ProjectionMode",
    "StorageDtype",
    "choose",
]


class CurvatureMode(StrEnum):
    """How the curvature of the recursion is estimated (``Recorder(curvature=...)``)."""

    #: The paper's estimator: curvature from the recorded gradients themselves; nothing extra is recorded.
    EMPIRICAL = "empirical"
    #: Gauss-Newton factor rows, back-propagated from the model's output during the step (dvemb.output_curvature).
    GGN = "ggn"


class CurvatureLoss(StrEnum):
    """The loss at the model's output that ggn mode models when it finds the rows itself."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class LossReduction(StrEnum):
    """Whether a step's gradient is the mean or the sum of its examples' gradients."""

    MEAN = "mean"
    SUM = "sum"


class ProjectionMode(StrEnum):
    """Where the projection bases come from (``Recorder(projection=...)``)."""

    #: rec.calibrate()'s bases when it runs before training, else bases fitted on the first steps.
    AUTO = "auto"
    #: rec.calibrate() must run before the first step.
    CALIBRATED = "calibrated"
    #: Seeded Gaussian Kronecker projection: nothing is fitted.
    RANDOM = "random"


class StorageDtype(StrEnum):
    """The dtype rows are stored in: the names of :data:`dvemb.logformat.STORAGE_DTYPES`, in its order."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class PositionReduction(StrEnum):
    """For (B, L, V) logits, whether an example's loss is the mean or the sum over its positions."""

    MEAN = "mean"
    SUM = "sum"


class Capture(StrEnum):
    """What the layer hooks capture right now."""

    #: Outside rec.step() and record_queries(): the hooks return at once.
    OFF = "off"
    #: Inside rec.step(): forward factors, output gradients of the loss, and the curvature rows.
    TRAIN = "train"
    #: A curvature pass inside a step: its gradients reach the layers' outputs but are not the loss's.
    CURVATURE = "curvature"
    #: A query batch of record_queries(): forward factors and the outputs' gradient edges only.
    QUERY = "query"


class BasisSource(StrEnum):
    """Where fitted bases were fitted (the manifest's ``projection.calibration.source``)."""

    BATCHES = "batches"  # rec.calibrate(batches)
    FIRST_STEPS = "first steps"  # fitted by the recorder itself on the held first steps


_Mode = TypeVar("_Mode", bound=StrEnum)


def choose(kind: type[_Mode], option: str, value: str) -> _Mode:
    """The member of ``kind`` that ``value`` names (a string or a member), for the option called ``option``.

    Anything else a caller passes despite the type (None, a number) is refused with the same message.

    Raises:
        ConfigError: ``value`` names no member; the message lists the accepted strings.
    """
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in kind)
        raise ConfigError(f"{option}={value!r} is not one of {choices}") from None
