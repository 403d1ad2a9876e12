"""tus 1.0 endpoints (core, creation, termination): see docs/service.md#uploads.

``POST /runs/{id}/uploads`` creates an upload (``Upload-Length``, ``Upload-Metadata: filename ...``),
``HEAD /uploads/{uid}`` tells the offset to resume from, ``PATCH /uploads/{uid}`` appends bytes at
``Upload-Offset``, ``DELETE /uploads/{uid}`` abandons it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dvemb.formats import is_index_name, is_manifest_name
from server.api.deps import IdPath, ProjectDep, SessionDep, SettingsDep, StorageDep, bearer
from server.api.waiting import wait_answer
from server.db.models import ApiToken, LogFile, Run
from server.db.session import session_factory
from server.db.states import FileStatus
from server.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unauthorized, UnsupportedMedia
from server.services import uploads as service
from server.services.auth import hash_token
from server.services.runs import get_run
from server.storage import PartBusy, PartWriter, Storage

router = APIRouter(tags=["uploads"])
TUS = service.TUS_HEADERS


def _check_version(tus_resumable: str | None) -> None:
    if tus_resumable != service.TUS_VERSION:
        raise BadRequest(
            f"Tus-Resumable header must be {service.TUS_VERSION}", headers={"Tus-Version": service.TUS_VERSION}
        )


@router.options("/uploads")
def tus_options(project: ProjectDep, settings: SettingsDep) -> Response:
    return Response(
        status_code=204,
        headers={
            **TUS,
            "Tus-Version": service.TUS_VERSION,
            "Tus-Extension": "creation,termination",
            "Tus-Max-Size": str(settings.max_file_bytes),
        },
    )


@router.post("/runs/{run_id}/uploads", status_code=201)
def create_upload(
    run_id: IdPath,
    request: Request,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
    upload_length: Annotated[int | None, Header()] = None,
    upload_metadata: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    _check_version(tus_resumable)
    if upload_length is None:
        raise BadRequest("Upload-Length header is required (deferred length is not supported)")
    name = service.parse_metadata(upload_metadata).get("filename")
    if not name:
        raise BadRequest("Upload-Metadata must carry the file name: 'filename <base64 name>'")
    run = get_run(session, project=project, run_id=run_id)
    upload = service.create_upload(session, run=run, name=name, length=upload_length, settings=settings)
    location = str(request.url_for("upload_head", upload_id=upload.upload_id))
    return Response(status_code=201, headers={**TUS, "Location": location, "Upload-Offset": "0"})


@router.head("/uploads/{upload_id}", name="upload_head")
def upload_head(upload_id: str, session: SessionDep, project: ProjectDep) -> Response:
    upload, _ = service.get_upload(session, project_id=project.id, upload_id=upload_id)
    return Response(
        status_code=200,
        headers={
            **TUS,
            "Upload-Offset": str(upload.offset),
            "Upload-Length": str(upload.size_bytes),
            "Cache-Control": "no-store",
        },
    )


@router.delete("/uploads/{upload_id}", status_code=204)
def upload_delete(
    upload_id: str, session: SessionDep, project: ProjectDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    upload, run = service.get_upload(session, project_id=project.id, upload_id=upload_id)
    if upload.status == FileStatus.READY:
        raise Conflict(f"{upload.name} is already validated; delete the run to remove it")
    if upload.status == FileStatus.RECEIVED and upload.error:
        service.delete_waiting(session, upload=upload, settings=settings)  # waiting for a manifest: its own call
        return Response(status_code=204, headers=TUS)
    if upload.status in (FileStatus.RECEIVED, FileStatus.VALIDATING):
        raise Conflict(f"{upload.name} is being validated; wait for the verdict")
    storage.delete_part(run.id, upload.upload_id)
    session.delete(upload)
    return Response(status_code=204, headers=TUS)


@router.patch("/uploads/{upload_id}")
async def upload_patch(
    upload_id: str,
    request: Request,
    project: ProjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    upload_offset: Annotated[int | None, Header()] = None,
    content_type: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    _check_version(tus_resumable)
    if content_type != "application/offset+octet-stream":
        raise UnsupportedMedia("PATCH needs Content-Type: application/offset+octet-stream")
    token = bearer(request.headers.get("authorization"))
    upload, run = await run_in_threadpool(_load, project.id, upload_id)
    if upload.status != FileStatus.UPLOADING:
        raise Conflict(f"{upload.name} is complete ({upload.status}); nothing more to append")
    part = await run_in_threadpool(_open_part, storage, run.id, upload.upload_id)
    with part:  # memory stays at one network chunk (a local file) or one flush (8 MiB, a bucket) whatever the size
        upload, run = await run_in_threadpool(_load, project.id, upload_id)  # fresh, under the lock
        if upload.status != FileStatus.UPLOADING:
            raise Conflict(f"{upload.name} is complete ({upload.status}); nothing more to append")
        if upload_offset != upload.offset:
            raise Conflict(
                f"Upload-Offset is {upload_offset} but the upload is at {upload.offset}; HEAD to resume",
                headers={"Upload-Offset": str(upload.offset)},
            )
        written = committed = 0
        try:
            await run_in_threadpool(part.start, upload.offset)
            async for chunk in _idle_limited(request, settings.upload_idle_seconds):
                if upload.offset + written + len(chunk) > upload.size_bytes:
                    raise PayloadTooLarge(
                        f"{upload.name}: more bytes than the declared Upload-Length {upload.size_bytes}"
                    )
                part.write(chunk)
                written += len(chunk)
                if written - committed >= _COMMIT_EVERY and upload.offset + written < upload.size_bytes:
                    await run_in_threadpool(part.flush)  # HEAD reports what is stored, not 0 until the end
                    if await run_in_threadpool(_advance, upload.id, upload.offset + written, token) == _REVOKED:
                        break  # the token was revoked meanwhile: nothing more is kept
                    committed = written
        except (ClientDisconnect, _Stalled):
            pass  # keep what arrived: the client resumes from the new offset
        finally:
            await run_in_threadpool(part.flush)
            offset = await run_in_threadpool(_advance, upload.id, upload.offset + written, token)
    if offset == _REVOKED:
        raise Unauthorized(
            "the token was revoked while this upload was being sent: the bytes received since are not kept; "
            "resume (HEAD for the offset) with a valid token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if offset is None:
        raise NotFound(f"upload {upload_id} was deleted while it was being written")
    # A data file can only be judged against a manifest: wait for the verdict when one is there. Manifests and
    # shard indexes are judged on their own: always wait (their validation also updates the run's row).
    if offset == upload.size_bytes and (
        is_manifest_name(upload.name) or is_index_name(upload.name) or run.manifest is not None
    ):
        await _wait_for_verdict(upload.id, settings.validation_wait_seconds)
    return Response(status_code=204, headers={**TUS, "Upload-Offset": str(offset)})


_COMMIT_EVERY = 8 << 20  # bytes between offset commits while a PATCH streams


def _open_part(storage: Storage, run_id: int, upload_id: str) -> PartWriter:
    """The upload's part, for this request alone (404 once abandoned or handed over, 409 while another request
    appends to it: a retried request racing the original must not interleave bytes)."""
    try:
        return storage.open_part(run_id, upload_id)
    except FileNotFoundError:
        raise NotFound(f"upload {upload_id} was abandoned or already handed to the validator") from None
    except PartBusy:
        raise Conflict("another request is appending to this upload; HEAD for the offset and retry") from None


class _Stalled(Exception):
    """The client sent nothing for the idle limit: the request ends and the upload's lock is released."""


async def _idle_limited(request: Request, idle_seconds: float) -> AsyncIterator[bytes]:
    """The request's body chunks; ends the request when none arrives for ``idle_seconds`` (a stalled
    connection must not hold the upload's lock, nor keep the server from shutting down)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=idle_seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _Stalled from None
        yield chunk


def _load(project_id: int, upload_id: str) -> tuple[LogFile, Run]:
    with session_factory()() as session:
        return service.get_upload(session, project_id=project_id, upload_id=upload_id)


#: :func:`_advance`'s answer when the request's token was revoked while its body streamed.
_REVOKED = -1


def _advance(file_id: int, offset: int, token: str | None) -> int | None:
    """Record the new absolute offset (idempotent: a commit repeated after a cancelled request counts once;
    None if the upload was deleted meanwhile); hand a complete file to the validator. Only while the request's
    token is still valid for the upload's project, checked in the same transaction (``_REVOKED`` otherwise: a
    PATCH that outlives its token's revocation keeps nothing it received since the last offset)."""
    with session_factory()() as session:
        upload = session.get(LogFile, file_id)
        if upload is None:
            return None
        project_id = session.scalar(select(Run.project_id).where(Run.id == upload.run_id))
        live = session.scalar(
            select(ApiToken.id).where(ApiToken.token_hash == hash_token(token or ""), ApiToken.project_id == project_id)
        )
        if live is None:
            return _REVOKED
        upload.offset = max(upload.offset, offset)
        if upload.offset == upload.size_bytes and upload.status == FileStatus.UPLOADING:
            service.finish_upload(session, upload=upload)
        session.commit()
        return upload.offset


async def _wait_for_verdict(file_id: int, seconds: float) -> None:
    """Answer the last PATCH with the validator's verdict when it comes in time (400 if rejected)."""
    found = await wait_answer(_status, file_id, seconds, settled=_judged)
    if found["status"] == FileStatus.REJECTED:
        raise BadRequest(f"rejected: {found['error']}")


def _judged(found: dict[str, Any]) -> bool:
    """Rejected, valid, or waiting for the manifest (its error says so)."""
    status = found["status"]
    return status in (FileStatus.REJECTED, FileStatus.READY) or (status == FileStatus.RECEIVED and bool(found["error"]))


def _status(file_id: int) -> dict[str, Any]:
    with session_factory()() as session:
        upload = session.get(LogFile, file_id)
        if upload is None:  # deleted meanwhile: nothing to wait for but the deadline
            return {"status": "missing", "error": None}
        return {"status": upload.status, "error": upload.error}
