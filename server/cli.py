"""``dvemb serve``, ``dvemb token`` and ``dvemb upload`` (registered through the ``dvemb.commands`` entry points)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from server.settings import get_settings


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
    upload = sub.add_parser("upload", help="upload a gradient log to a server (resumable)")
    upload.add_argument("log_dir")
    upload.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    upload.add_argument("--token", default=os.environ.get("DVEMB_TOKEN"), help="API token (or DVEMB_TOKEN)")
    upload.add_argument("--run", help="run name (default: the log directory's name)")
    upload.add_argument("--analyze", action="store_true", help="start an analysis once uploaded")
    upload.add_argument("--wait", action="store_true", help="with --analyze, wait for the analysis to finish")
    upload.set_defaults(func=_upload)


def prepare() -> None:
    """Make the data and storage directories and bring the schema to the latest migration."""
    from server.migrate import upgrade

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


def worker_command(queues: str = "celery,gpu", concurrency: int = 1) -> list[str]:
    """The command line of a worker process (the same Celery tasks in every mode)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
    ]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

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


def _upload(args: argparse.Namespace) -> int:
    from server.upload_client import upload_log

    if not args.token:
        print("dvemb upload: --token (or DVEMB_TOKEN) is required", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir)
    result = upload_log(
        log_dir, server=args.server, token=args.token, run_name=args.run or log_dir.resolve().name, analyze=args.analyze
    )
    if args.analyze and args.wait and result.get("job"):
        result["job"] = _wait_for_job(args.server, args.token, result["job"]["id"])
    print(json.dumps(result, indent=2))
    return 0 if not result.get("rejected") else 1


def _wait_for_job(server: str, token: str, job_id: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        job: dict[str, Any] = httpx.get(f"{server}/api/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
