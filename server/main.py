"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import plotly
import swagger_ui
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.api.limits import BodyLimit
from server.api.routes import compare, exports, figures, health, jobs, project, queries, runs, uploads, windows
from server.db.session import session_factory
from server.errors import install_handlers
from server.reconciler import Reconciler
from server.settings import get_settings

FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
# plotly.js ships inside the plotly wheel: served from there, never from a CDN (no internet needed).
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# Swagger UI's files ship inside the swagger-ui-py wheel: /api/v1/docs works offline.
SWAGGER_UI = Path(swagger_ui.__file__).parent / "static"

API_PREFIX = "/api/v1"


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Each API process runs a reconciler: unsent tasks and jobs of dead workers (server/reconciler.py)."""
    reconciler = Reconciler(session_factory(), get_settings().reconcile_seconds).start()
    try:
        yield
    finally:
        reconciler.stop()


def create_app() -> FastAPI:
    """The API: everything under /api/v1, bearer-token auth on everything but /api/v1/health."""
    app = FastAPI(
        title="dvemb",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served below with Swagger UI's files from this server, not from a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    # The hot reads first, on the app itself: FastAPI finds a route by scanning the routes of every router included
    # before its own, nested routers twice (to match, then to dispatch), which cost /examples 0.2 ms of CPU per
    # request behind the two dozen routes before it (issue 25.5). No other route's path can match theirs.
    app.include_router(jobs.hot_reads, prefix=API_PREFIX)
    api = APIRouter(prefix=API_PREFIX)
    for module in (health, project, runs, uploads, jobs, queries, figures, windows, compare, exports):
        api.include_router(module.router)
    app.include_router(api)
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=get_settings().max_request_bytes)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static/swagger-ui", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")

    @app.get(f"{API_PREFIX}/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{API_PREFIX}/openapi.json",
            title="dvemb API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(FRONTEND / "favicon.svg", media_type="image/svg+xml")

    # The dashboard: static files that talk to the API with the user's token (nothing is shown without one).
    # Only what the browser needs is served (not the lint tools' node_modules or configs).
    app.mount("/js", StaticFiles(directory=FRONTEND / "js"), name="dashboard-modules")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(FRONTEND / "index.html", media_type="text/html")

    @app.get("/style.css", include_in_schema=False)
    def stylesheet() -> FileResponse:
        return FileResponse(FRONTEND / "style.css", media_type="text/css")

    return app


app = create_app()
