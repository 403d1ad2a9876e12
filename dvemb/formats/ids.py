"""Example ids as arrays and back: ``example_id`` (R,) int64, or ``example_id_utf8`` (UTF-8 bytes) with
``example_id_offsets`` (R + 1,) int64 for string ids. The same tensors are stored in shards, query files
and results (safetensors), so any reader, with or without torch, decodes them alike."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_ID_CHARS", "check_ids", "decode_ids", "encode_ids", "id_type", "repeated_in_step", "unsafe_character"]

#: Longest string id (characters): ids are shown, filtered and stored as database keys.
MAX_ID_CHARS = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]")
#: What no text of a log may hold: NUL (the database cannot store it) and the bidirectional embeddings, overrides
#: and isolates (U+202A-U+202E, U+2066-U+2069), which make a shown text read otherwise than it is.
_UNSAFE = re.compile(r"[\x00\u202a-\u202e\u2066-\u2069]")


def unsafe_character(text: str) -> str | None:
    """The first character of ``text`` that no text of a log may hold (NUL, a bidirectional override, embedding
    or isolate), as ``U+XXXX``; None when there is none."""
    found = _UNSAFE.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def repeated_in_step(example: object, step: int) -> str:
    """Why a log may not hold ``example`` twice in ``step``, and the fix (the recorder's and the validator's
    words): a step's rows are its distinct examples."""
    return (
        f"example id {example!r} appears twice in step {step}: each example is at most once in a step (a sampler "
        "that draws with replacement must give each draw its own id, e.g. f'{index}#{draw}')"
    )


def check_ids(ids: Sequence[int | str]) -> None:
    """A :class:`ValueError` naming the first id that is negative, or a string id that is too long or holds a
    control character (NUL, newline, a bidirectional override...): such ids cannot be shown, filtered or stored as
    database keys."""
    for position, i in enumerate(ids):
        if isinstance(i, str) and (len(i) > MAX_ID_CHARS or _CONTROL.search(i)):
            shown = ascii(i[:40]) + ("..." if len(i) > 40 else "")
            raise ValueError(
                f"example id {position} ({shown}) is longer than {MAX_ID_CHARS} characters or holds a control "
                "character; use short printable ids (a dataset index, a hash, a file name)"
            )
        if not isinstance(i, str) and i < 0:
            raise ValueError(
                f"example id {position} is {i}: integer ids are dataset indices, 0 or more (or use string ids)"
            )


def encode_ids(ids: Sequence[int | str]) -> dict[str, np.ndarray]:
    """Ids as arrays; a :class:`ValueError` naming the types when ints and strings are mixed."""
    if all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
        array = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        if array.size and int(array.min()) < 0:
            check_ids([int(i) for i in array.tolist()])  # names the first negative id
        return {"example_id": array}
    if all(isinstance(i, str) for i in ids):
        check_ids(ids)
        encoded = [str(i).encode("utf-8") for i in ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return {"example_id_utf8": data, "example_id_offsets": offsets}
    kinds = sorted({type(i).__name__ for i in ids})
    raise ValueError(f"example ids must be all int or all str; got {', '.join(kinds)}")


def decode_ids(arrays: Mapping[str, Any]) -> list[int] | list[str]:
    """Inverse of :func:`encode_ids`; accepts numpy arrays or anything with ``.tolist()`` / ``.numpy()``."""
    if "example_id" in arrays:
        return [int(i) for i in arrays["example_id"].tolist()]
    raw = arrays["example_id_utf8"]
    data = bytes((raw.numpy() if hasattr(raw, "numpy") else np.asarray(raw)).tobytes())
    offsets = arrays["example_id_offsets"].tolist()
    return [data[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)]


def id_type(ids: Sequence[int | str]) -> str:
    """``"int"`` or ``"str"``."""
    return "str" if ids and isinstance(ids[0], str) else "int"
