"""A status column typed by its enum: stored as the enum's string (the same ``VARCHAR(20)`` as before, no
migration), read back as the enum member, and refused on the way in when the value is not one of the enum's."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["StatusColumn"]

E = TypeVar("E", bound=StrEnum)


class StatusColumn(TypeDecorator[E]):
    """``VARCHAR(20)`` holding one of ``enum``'s values; Python sees ``enum`` members.

    Args:
        enum: the status enum (dvemb/formats/statuses.py).
    """

    impl = String(20)
    cache_ok = True

    def __init__(self, enum: type[E]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        """The stored string; a value outside the enum raises ValueError naming it before anything is written."""
        if value is None:
            return None
        try:
            return self.enum(value).value
        except ValueError:
            allowed = ", ".join(member.value for member in self.enum)
            raise ValueError(f"{value!r} is not a {self.enum.__name__}: one of {allowed}") from None

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)
