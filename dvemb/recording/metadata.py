"""Example metadata (``rec.describe``): what training examples are, for the dashboard to show next to them."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dvemb.errors import ConfigError
from dvemb.formats import check_ids, unsafe_character
from dvemb.recording.ids import as_id_list

__all__ = ["example_records"]

#: The most values one image may hold (a 128 x 128 RGBA thumbnail): the log is no image store.
MAX_IMAGE_PIXELS = 128 * 128 * 4


def example_records(
    ids: Any,
    *,
    texts: Sequence[str] | None,
    labels: Sequence[int | str] | None,
    sources: Sequence[str] | None,
    images: Any,
) -> list[dict[str, Any]]:
    """One record per example for the log's example files (``Recorder.describe`` documents the arguments).

    Raises:
        ConfigError: a column's length differs from the ids', an id is invalid, a text holds what no log may
            hold, or the images are not (N, H, W[, C]) small images.
    """
    id_list = as_id_list(ids)
    columns = {"text": texts, "label": labels, "source": sources}
    for key, values in columns.items():
        if values is not None and len(values) != len(id_list):
            raise ConfigError(f"describe(): {len(values)} {key}s for {len(id_list)} ids")
    try:
        check_ids(id_list)
    except ValueError as exc:
        raise ConfigError(f"describe(): {exc}") from None
    records: list[dict[str, Any]] = [{"id": i} for i in id_list]
    for key, values in columns.items():
        if values is not None:
            for record, value in zip(records, values, strict=True):
                record[key] = value.item() if isinstance(value, torch.Tensor | np.generic) else value
                _check_text(key, record)
    if images is not None:
        for record, image in zip(records, _encode_images(images, len(id_list)), strict=True):
            record["image"] = image
    return records


def _check_text(key: str, record: dict[str, Any]) -> None:
    """A ConfigError when an example's text, label or source holds what no log may hold (the validator would refuse
    the whole log at upload): said when it is described, not after training."""
    value = record[key]
    unsafe = unsafe_character(value) if isinstance(value, str) else None
    if unsafe is not None:
        raise ConfigError(
            f"describe(): the {key} of example {record['id']!r} holds {unsafe} (NUL, or a bidirectional override that "
            "makes the shown text read otherwise); remove it"
        )


def _encode_images(images: Any, count: int) -> list[dict[str, Any]]:
    """(N, H, W) or (N, H, W, C) images, uint8 or floats in [0, 1], as uint8 bytes in base64 with their shape."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype.kind == "f":
        array = np.clip(np.rint(array * 255.0), 0, 255)
    array = array.astype(np.uint8)
    if array.ndim not in (3, 4) or array.shape[0] != count or array[0].size > MAX_IMAGE_PIXELS:
        raise ConfigError(
            f"describe(): images must be (N, H, W) or (N, H, W, C) with N={count} and at most "
            f"{MAX_IMAGE_PIXELS} values each; got {array.shape}"
        )
    return [{"shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")} for a in array]
