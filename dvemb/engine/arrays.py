"""Memory-mapped working arrays of a computation, and writing safetensors files from them in bounded memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dvemb.atomic import replacing

__all__ = ["open_array", "save_safetensors"]

_DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.float64): "F64", np.dtype(np.float32): "F32"}
_COPY_BYTES = 64 << 20


def open_array(path: Path, shape: tuple[int, ...], dtype: Any, *, resume: bool) -> np.memmap:
    """A ``.npy`` file mapped into memory: the existing one (``resume``) or a new zero-filled one."""
    if resume:
        array = np.load(path, mmap_mode="r+")
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise ValueError(f"{path} holds {array.dtype}{array.shape}, expected {np.dtype(dtype)}{shape}")
        return array  # type: ignore[no-any-return]
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def save_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from (possibly memory-mapped) arrays, copying at most 64 MiB at a time.

    Written to a temporary name and moved into place, so a reader never sees half a file.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, array in arrays.items():
        size = array.size * array.itemsize
        header[name] = {
            "dtype": _DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays.values():
            flat = array.reshape(-1)
            step = max(1, _COPY_BYTES // max(array.itemsize, 1))
            for start in range(0, flat.size, step):
                f.write(
                    np.ascontiguousarray(flat[start : start + step]).astype(array.dtype.newbyteorder("<")).tobytes()
                )
