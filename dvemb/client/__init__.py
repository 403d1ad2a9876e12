"""The client of the dvemb service: upload a gradient log (resumable, tus) and follow its analysis.

Installed with ``pip install dvemb[client]`` (httpx and tuspy): it needs none of the server's packages
and no torch, so it runs on training machines as they are. Its names load on first use, so that the
core CLI can register ``dvemb upload`` without the extra installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvemb.client.upload import UploadError, start_replay, upload_agreement, upload_log, wait_for_job

__all__ = ["UploadError", "start_replay", "upload_agreement", "upload_log", "wait_for_job"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dvemb.client' has no attribute {name!r}")
    from dvemb.client import upload

    return getattr(upload, name)
