"""Service errors, rendered by one handler as ``{"error": ..., "detail": ...}``::

    ServiceError(message, status_code)
    ├── BadRequest          400  the request cannot be honoured as sent (the message says why)
    ├── Unauthorized        401  no or unknown bearer token
    ├── NotFound            404  absent, or another project's
    ├── Conflict            409  state does not allow it (e.g. upload offset mismatch)
    ├── PayloadTooLarge     413  over a configured size limit
    ├── TooManyRequests     429  over a per-project quota (the message names it and when to come back)
    ├── UnsupportedMedia    415  wrong content type for a tus PATCH
    ├── TimedOut            504  the database stopped the request's statements at its time limit
    └── Unavailable         503  the database cannot be reached (an outage), or this process's connections to it are
                                 all in use (busy): retry later
422 is left to FastAPI's payload validation. Everything else takes the same shape too: the framework's own errors
(unknown route, method not allowed, a body that cannot be parsed: 400), a database outage (503), and any error
nobody foresaw (500, its traceback in the log, never in the answer).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.db.session import timed_out

_log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status and a message meant for the user."""

    status_code = 500
    error = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code, error = 400, "bad_request"


class Unauthorized(ServiceError):
    status_code, error = 401, "unauthorized"


class NotFound(ServiceError):
    status_code, error = 404, "not_found"


class Conflict(ServiceError):
    status_code, error = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status_code, error = 413, "payload_too_large"


class TooManyRequests(ServiceError):
    status_code, error = 429, "too_many_requests"


class UnsupportedMedia(ServiceError):
    status_code, error = 415, "unsupported_media_type"


class TimedOut(ServiceError):
    status_code, error = 504, "timeout"


class Unavailable(ServiceError):
    status_code, error = 503, "unavailable"


#: The ``error`` of the framework's own HTTP errors (404 for an unknown route, 405, 400 for an unparsable body).
_HTTP_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
_OUTAGE = (
    "the database cannot be reached right now (restarting, or unreachable from the server): retry in a few seconds"
)


_BUSY = (
    "every database connection of this API process is in use (DVEMB_DATABASE_POOL_SIZE and "
    "DVEMB_DATABASE_MAX_OVERFLOW bound them): retry in a few seconds"
)


def install_handlers(app: FastAPI) -> None:
    """Render ServiceError and validation errors as ``{"error", "detail"}``."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.error, "detail": exc.message},
            status_code=exc.status_code,
            headers={"Tus-Resumable": "1.0.0", **exc.headers},
        )

    @app.exception_handler(DataError)
    async def _unstorable_value(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (a NUL character in a text, a number out of its
        # range): the request's fault, said in words; never the SQL.
        return JSONResponse(
            {
                "error": "bad_request",
                "detail": "a value in the request cannot be stored or searched for (a NUL character, or a number "
                "out of range); remove it and retry",
            },
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body it cannot parse (a JSON array nested 100,000 deep, invalid UTF-8) with 400 here.
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = (
                "the request's body cannot be parsed (malformed, or JSON nested too deeply); send a flat JSON object"
            )
        error = _HTTP_ERRORS.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": error, "detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unreachable(_: Request, exc: DBAPIError) -> JSONResponse:
        if isinstance(exc, OperationalError) and timed_out(exc):
            body = {"error": TimedOut.error, "detail": "the database stopped this request at its time limit; retry"}
            return JSONResponse(body, status_code=TimedOut.status_code)
        _log.warning("database unreachable: %s", type(exc.orig).__name__ if exc.orig is not None else exc)
        body = {"error": Unavailable.error, "detail": _OUTAGE}
        return JSONResponse(body, status_code=Unavailable.status_code, headers={"Retry-After": "5"})

    @app.exception_handler(PoolTimeout)
    async def _connections_spent(_: Request, exc: PoolTimeout) -> JSONResponse:
        # Every connection of this API process's pool was in use for DVEMB_DATABASE_POOL_TIMEOUT_SECONDS: the
        # server is busy, not broken; the client retries (docs/service.md, "Database connections").
        _log.warning("database pool spent: %s", exc)
        body = {"error": Unavailable.error, "detail": _BUSY}
        return JSONResponse(body, status_code=Unavailable.status_code, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unforeseen(_: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback (the exception is raised again after this answer is sent).
        detail = f"the server failed on this request ({type(exc).__name__}); it is in the server's log"
        return JSONResponse({"error": "internal_error", "detail": detail}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)
