"""``dvemb serve`` and ``dvemb token`` (registered through the ``dvemb.commands`` entry points)."""

from __future__ import annotations

import argparse
import subprocess
from typing import Any


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the API with a local worker (embedded: SQLite, local storage)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="do not start a local worker (distributed mode)")
    serve.add_argument("--project", default="default")
    serve.set_defaults(func=_serve)
    token = sub.add_parser("token", help="create an API token for a project (prints it once)")
    token.add_argument("--project", default="default")
    token.add_argument("--name", default="cli")
    token.set_defaults(func=_token)


def prepare() -> None:
    """Make the data and storage directories and bring the schema to the latest migration."""
    from server.migrate import upgrade
    from server.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.storage.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database)


def new_token(project: str, name: str) -> str:
    """A new API token for ``project`` (created if needed); printed once, stored hashed."""
    from server.db.session import session_factory
    from server.services.auth import create_token, get_or_create_project

    with session_factory()() as session:
        token = create_token(session, project=get_or_create_project(session, name=project), name=name)
        session.commit()
    return token


def _token(args: argparse.Namespace) -> int:
    prepare()
    print(new_token(args.project, args.name))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.settings import get_settings
    from server.tasks import worker_command

    prepare()
    token = new_token(args.project, "serve")
    settings = get_settings()
    worker = None if args.no_worker else subprocess.Popen(worker_command())
    print(
        f"dvemb serving on http://{args.host}:{args.port}  (database {settings.database}, storage {settings.storage})"
    )
    print(f"API token for project {args.project!r}: {token}")
    try:
        uvicorn.run("server.main:app", host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
    return 0
