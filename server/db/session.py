"""Engines and sessions (sync SQLAlchemy 2; ``expire_on_commit=False``)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from server.once import made_once
from server.settings import get_settings


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets foreign keys, WAL and a busy timeout (API and worker share the file)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool_options())


def pool_options() -> dict[str, float]:
    """The PostgreSQL pools' bounds from the settings (DVEMB_DATABASE_POOL_SIZE, _MAX_OVERFLOW, _POOL_TIMEOUT_SECONDS;
    by default 20 + 20: SQLAlchemy's 5 + 10 made new connections under 16 clients)."""
    settings = get_settings()
    return {
        "pool_size": settings.database_pool_size,
        "max_overflow": settings.database_max_overflow,
        "pool_timeout": settings.database_pool_timeout_seconds,
    }


@made_once
def get_engine() -> Engine:
    """The process's engine for the configured database."""
    return make_engine(get_settings().database)


@made_once
def get_read_engine() -> Engine:
    """The engine of the hot reads (server/services/reads.py): on PostgreSQL in autocommit, without a ping per
    checkout (a request is one statement: no BEGIN, ROLLBACK or ping round trips around it; a connection found
    dead is retried once by the caller); SQLite shares the process's engine."""
    url = get_settings().database
    if url.startswith("sqlite"):
        return get_engine()
    # A hot read is one statement in autocommit: its time limit is the connection's (no SET LOCAL round trip).
    limit = round(get_settings().read_timeout_seconds * 1000)
    options = {"options": f"-c statement_timeout={limit}"} if limit > 0 else {}
    return create_engine(url, isolation_level="AUTOCOMMIT", connect_args=options, **pool_options())


# PostgreSQL's SQLSTATE of a statement cancelled at statement_timeout (query_canceled).
QUERY_CANCELED = "57014"


def limit_statement_time(session: Session, seconds: float) -> None:
    """Stops every later statement of the session's transaction that runs (or waits for a lock) longer than
    ``seconds`` (0: no limit): ``SET LOCAL statement_timeout`` on PostgreSQL, which ends with the transaction, so
    a pooled connection never keeps it. SQLite (embedded, one user) has no such limit: nothing is done."""
    if seconds > 0 and session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}"))


def limit_every_transaction(session: Session, seconds: float) -> None:
    """:func:`limit_statement_time` for each transaction the session begins (a request may commit midway and go on
    in a new one). SQLite: nothing is done."""
    if seconds <= 0 or session.get_bind().dialect.name != "postgresql":
        return
    statement = f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}"

    @event.listens_for(session, "after_begin")
    def _limit(_session: Session, _transaction: object, connection: Connection) -> None:
        connection.exec_driver_sql(statement)


def timed_out(exc: OperationalError) -> bool:
    """Whether the database cancelled the statement at its time limit (see limit_statement_time)."""
    return getattr(exc.orig, "sqlstate", None) == QUERY_CANCELED


def session_factory() -> sessionmaker[Session]:
    """Sessions bound to the process's engine."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def get_session(request: Request) -> Iterator[Session]:
    """Request-scoped session: commits on success, rolls back on error. Its statements stop at the request class's
    time limit (PostgreSQL; DVEMB_READ_TIMEOUT_SECONDS for a GET, DVEMB_WRITE_TIMEOUT_SECONDS otherwise), so that no
    request holds the shared database for long; a stopped statement answers 504 (server/errors.py)."""
    settings = get_settings()
    limit = settings.read_timeout_seconds if request.method in ("GET", "HEAD") else settings.write_timeout_seconds
    with session_factory()() as session:
        try:
            limit_every_transaction(session, limit)
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
