"""The FastAPI application."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from server.api.routes import health, jobs, queries, runs, uploads
from server.errors import install_handlers

API_PREFIX = "/api/v1"


def create_app() -> FastAPI:
    """The API: everything under /api/v1, bearer-token auth on everything but /api/v1/health."""
    app = FastAPI(
        title="dvemb",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    api = APIRouter(prefix=API_PREFIX)
    for module in (health, runs, uploads, jobs, queries):
        api.include_router(module.router)
    app.include_router(api)
    install_handlers(app)
    return app


app = create_app()
