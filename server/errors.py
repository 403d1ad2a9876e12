"""Service errors, rendered by one handler as ``{"error": ..., "detail": ...}``::

    ServiceError(message, status_code)
    ├── BadRequest          400  the request cannot be honoured as sent (the message says why)
    ├── Unauthorized        401  no or unknown bearer token
    ├── NotFound            404  absent, or another project's
    ├── Conflict            409  state does not allow it (e.g. upload offset mismatch)
    ├── PayloadTooLarge     413  over a configured size limit
    ├── TooManyRequests     429  over a per-project quota (the message names it and when to come back)
    ├── UnsupportedMedia    415  wrong content type for a tus PATCH
    └── TimedOut            504  the database stopped the request's statements at its time limit
422 is left to FastAPI's payload validation.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError


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

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)
