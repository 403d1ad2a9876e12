"""The three phases of training that results are reported in (the paper's figure 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

__all__ = ["PHASE_NAMES", "PhaseName", "phase_of"]

PhaseName = Literal["early", "basin", "late"]
PHASE_NAMES: tuple[str, ...] = get_args(PhaseName)


def phase_of(step: int, boundaries: Sequence[int]) -> str:
    """The phase of ``step`` given ``boundaries`` = [first step of the basin, first step of the late phase]."""
    return PHASE_NAMES[0] if step < boundaries[0] else PHASE_NAMES[1] if step < boundaries[1] else PHASE_NAMES[2]
