"""Torch-side constants and codecs shared by the gradient-log writer and reader (see docs/format.md).

File names, the id codec and the phase names live in :mod:`dvemb.formats` (numpy only, shared with the
server); this module adds tensor names, dtypes and the safetensors header check.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dvemb import formats
from dvemb.errors import ConfigError, HeaderMismatchError, NotSafetensorsError, TruncatedFileError
from dvemb.formats import MANIFEST, PROJECTION_FILE, QUERY_SET_NAME, id_type, rank_manifest_name, shard_name

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "PROJECTION_FILE",
    "QUERY_SET_NAME",
    "READABLE_VERSIONS",
    "basis_key",
    "curvature_key",
    "decode_ids",
    "encode_ids",
    "grad_key",
    "id_type",
    "optimizer_layer_key",
    "rank_manifest_name",
    "read_safetensors_header",
    "shard_name",
]

FORMAT_NAME = "dvemb-gradient-log"
FORMAT_VERSION = 3
#: Versions this dvemb reads: 1 (no optimizer state: influence uses the SGD proxy for momentum and Adam),
#: 2 (shards listed in the manifest, rewritten after every shard), 3 (shards listed in an append-only index).
READABLE_VERSIONS = (1, 2, 3)
#: Per-step, per-layer scalars of the optimizer's linearised update, (S, n_layers) float64 in a shard.
OPTIMIZER_SCALARS = ("opt.momentum", "opt.dampening", "opt.beta2", "opt.eps", "opt.step")
#: Per-layer optimizer state per step. A layer stored whole, (S, d) each: Adam's exact preconditioner
#: ``precond``, the sensitivity ``vsens`` of the update to the second moment (divided by lr) and the
#: gradient ``batch_grad`` the moments took in. A projected layer: the row and column sums of the
#: bias-corrected second moment, ``v_row`` (S, out_dim) and ``v_col`` (S, in_dim), and for Adam's second-moment
#: term the top R singular pairs of ``vsens`` and ``batch_grad`` as matrices (dvemb.low_rank): ``vsens_out``
#: (S, R, out_dim), ``vsens_in`` (S, R, in_dim), ``bgrad_out``, ``bgrad_in`` (absent in logs before them).
OPTIMIZER_LAYER_TENSORS = (
    "precond",
    "vsens",
    "batch_grad",
    "v_row",
    "v_col",
    "vsens_out",
    "vsens_in",
    "bgrad_out",
    "bgrad_in",
)
#: The second-moment factors of a projected layer: (left, right) pairs of ``vsens`` and ``batch_grad``.
SECOND_MOMENT_FACTORS = (("vsens_out", "vsens_in"), ("bgrad_out", "bgrad_in"))
WHOLE_LAYER_ADAM_TENSORS = ("precond", "vsens", "batch_grad")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,  # for exactness checks on small models
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "U8": torch.uint8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors limit


def grad_key(layer: str) -> str:
    """Tensor name of a layer's projected gradients in a shard or query file."""
    return f"grad.{layer}"


def curvature_key(layer: str) -> str:
    """Tensor name of a layer's curvature factors in a shard."""
    return f"curv.{layer}"


def basis_key(side: str, layer: str) -> str:
    """Tensor name of a layer's calibrated basis of ``side`` (``"out"`` or ``"in"``) in the projection file."""
    return f"basis_{side}.{layer}"


def optimizer_layer_key(what: str, layer: str) -> str:
    """Tensor name of a layer's per-step optimizer state (``what`` in :data:`OPTIMIZER_LAYER_TENSORS`)."""
    if what not in OPTIMIZER_LAYER_TENSORS:
        raise ValueError(f"unknown optimizer tensor {what!r}")
    return f"opt.{what}.{layer}"


def encode_ids(ids: Sequence[int | str]) -> dict[str, torch.Tensor]:
    """Example ids as tensors (:func:`dvemb.formats.encode_ids`); a :class:`ConfigError` for mixed types."""
    try:
        arrays = formats.encode_ids(ids)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def decode_ids(tensors: dict[str, torch.Tensor]) -> list[int] | list[str]:
    """Inverse of :func:`encode_ids`."""
    return formats.decode_ids(tensors)


def read_safetensors_header(
    path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and check a safetensors header without trusting it.

    Checks that the file starts with a sane header length and a JSON header, that every tensor's
    dtype is known, that its byte span equals ``prod(shape) * itemsize``, that spans are contiguous
    from 0, and that the file holds exactly the bytes the header describes.

    Returns:
        (tensors: name -> {dtype, shape, data_offsets}, metadata, total file size).

    Raises:
        NotSafetensorsError: not a safetensors file (for example a pickle).
        HeaderMismatchError: the header contradicts itself.
        TruncatedFileError: the file is shorter than the header says.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise NotSafetensorsError(path, f"not a safetensors file: only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if 0 < header_len <= min(size - 8, MAX_HEADER_BYTES) and header_len > max_header_bytes:
            raise HeaderMismatchError(
                path, f"a header of {header_len} bytes; files of this log have headers of at most {max_header_bytes}"
            )
        if header_len <= 0 or header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise NotSafetensorsError(path, f"not a safetensors file: header length field says {header_len} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensorsError(path, f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(path, "not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        _check_tensor_entry(path, name, info)
        begin, end = info["data_offsets"]
        spans.append((begin, end, name))
    spans.sort()
    expected_begin = 0
    for begin, end, name in spans:
        if begin != expected_begin:
            raise HeaderMismatchError(path, f"tensor {name!r} starts at byte {begin}, expected {expected_begin}")
        expected_begin = end
    data_bytes = size - 8 - header_len
    if data_bytes < expected_begin:
        raise TruncatedFileError(
            path, f"truncated: the header describes {expected_begin} data bytes but the file holds {data_bytes}"
        )
    if data_bytes > expected_begin:
        raise HeaderMismatchError(
            path, f"the file holds {data_bytes - expected_begin} bytes after the last tensor the header describes"
        )
    return header, metadata, size


def _check_tensor_entry(path: Path, name: str, info: Any) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise HeaderMismatchError(path, f"tensor {name!r} has a malformed header entry")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise HeaderMismatchError(path, f"tensor {name!r} has dtype {info['dtype']!r}, which dvemb does not use")
    shape, offsets = info["shape"], info["data_offsets"]
    valid = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    valid = valid and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not valid:
        raise HeaderMismatchError(path, f"tensor {name!r} has a malformed shape or offsets")
    count = 1
    for s in shape:
        count *= s
    claimed = count * torch.empty(0, dtype=dtype).element_size()
    if offsets[1] - offsets[0] != claimed:
        raise HeaderMismatchError(
            path,
            f"tensor {name!r} claims shape {shape} {info['dtype']} = {claimed} bytes "
            f"but its data offsets span {offsets[1] - offsets[0]} bytes",
        )
