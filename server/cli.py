"""``dvemb serve`` and ``dvemb token`` (registered through the ``dvemb.commands`` entry points)."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from server.bad_settings import refusing_bad_settings


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the API with a local worker (embedded: SQLite, local storage)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="do not start a local worker (distributed mode)")
    serve.add_argument("--project", default="default")
    serve.set_defaults(func=refusing_bad_settings(_serve))
    token = sub.add_parser("token", help="create an API token for a project (prints it once)")
    token.add_argument("--project", default="default")
    token.add_argument("--name", default="cli")
    token.set_defaults(func=refusing_bad_settings(_token))


def prepare() -> None:
    """Make the data and storage directories and bring the schema to the latest migration."""
    from server.migrate import upgrade
    from server.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.storage_url:
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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``docker stop``, ``kill``, a supervisor) stops the process the way Ctrl-C
    does, so that ``finally`` blocks run and the local worker is stopped with it instead of left running.
    (uvicorn handles SIGTERM while it serves and then re-raises it: this handler turns that into an
    interrupt too.)"""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """Terminate a child process and wait for it (killed if it does not stop in ``timeout`` seconds)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalWorker:
    """The embedded mode's worker process, kept alive: restarted (after ``backoff`` seconds) whenever it exits
    while the server runs (killed, out of memory), so that queued tasks and the jobs the reconciler re-queues
    after a lost worker (server/reconciler.py) are computed without anyone restarting ``dvemb serve``."""

    def __init__(
        self,
        command: list[str],
        backoff: float = 1.0,
        *,
        quiet: bool = False,
        on_restart: Callable[[], object] | None = None,
    ) -> None:
        self.command, self.backoff, self.on_restart = command, backoff, on_restart
        self.stdout = subprocess.DEVNULL if quiet else None  # quiet: no Celery banner (the demo's own output)
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.watcher = threading.Thread(target=self._watch, daemon=True, name="dvemb-local-worker")

    def start(self) -> LocalWorker:
        with self.lock:
            self.process = subprocess.Popen(self.command, stdout=self.stdout)
        self.watcher.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            stop_process(self.process)

    def _released(self) -> None:
        """What the dead worker held is given back (``on_restart``); a failure is logged, the restart goes on (the
        leases still expire)."""
        if self.on_restart is None:
            return
        try:
            self.on_restart()
        except Exception:  # the database may be down: the reconciler catches up later
            logging.getLogger(__name__).exception("could not give back the stopped worker's jobs and files")

    def _watch(self) -> None:
        while not self.stopping.is_set():
            process = self.process
            if process is not None and process.poll() is not None and not self.stopping.wait(self.backoff):
                with self.lock:
                    if self.stopping.is_set():
                        return
                    logging.getLogger(__name__).warning(
                        "the local worker stopped (exit status %s): starting another", process.returncode
                    )
                    self._released()
                    self.process = subprocess.Popen(self.command, stdout=self.stdout)
            self.stopping.wait(0.5)


def lost_worker_release() -> Callable[[], object] | None:
    """In the embedded mode (SQLite: no other worker can share the database) the local worker is the only one, so
    when it dies everything running was its: queued again at once (server/reconciler.py, release_lost_worker).
    With a shared database other workers may hold leases: they expire as usual."""
    from server.db.session import session_factory
    from server.reconciler import release_lost_worker
    from server.settings import get_settings

    if not get_settings().database.startswith("sqlite"):
        return None
    return lambda: release_lost_worker(session_factory())


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.settings import get_settings
    from server.storage import get_storage
    from server.tasks import worker_command

    prepare()
    token = new_token(args.project, "serve")
    settings = get_settings()
    worker = None if args.no_worker else LocalWorker(worker_command(), on_restart=lost_worker_release()).start()
    print(
        f"dvemb serving on http://{args.host}:{args.port}  (database {settings.database}, storage {get_storage().url})"
    )
    print(f"API token for project {args.project!r}: {token}")
    try:
        with sigterm_as_interrupt():
            uvicorn.run("server.main:app", host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            worker.stop()
    return 0
