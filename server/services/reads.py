"""The hot reads (a job's top-k rows, its ranked examples, its curve) answered with one SQL statement each: the
token's project, the job, its status and the page of rows with their total count come back together, through
one pooled connection (SQLAlchemy Core, no ORM session), so a request costs one thread-pool hop and one round
trip (issue 14.6: the ORM and 4-6 queries cost 10-20x a bare endpoint's CPU).

On PostgreSQL the statement, built with SQLAlchemy Core, is compiled once per process and run on the pool's
DBAPI connection, its rows read as the driver's tuples: SQLAlchemy's per-execution work (a Connection, the
compiled-cache lookup, an execution context, result metadata from the cursor's description, Row objects) cost
0.12 ms of CPU per request, about as much as the driver's own (issue 25.5). Nothing else changes: the same SQL and
parameters, the same pool, values converted as SQLAlchemy would (the types that convert), errors raised as
SQLAlchemy's (so a statement stopped at its time limit is still a 504, an unreachable database a 503). SQLite, and
an engine someone listens to (``before_cursor_execute``: tracing, tests counting statements), go through
SQLAlchemy's Connection as before.

When the statement returns nothing (a wrong token, another project's job, a page past the end) or says the job
has not succeeded, :func:`diagnose` finds out which, with the ordinary services, so that every error is the
same as elsewhere in the API. A job's summary (its query sets, top_k, propagation label and approximations) never
changes once it has succeeded: it is parsed once per process and kept (keyed by the job's id and creation time, so
a database reset cannot serve another job's summary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, Integer, Select, and_, bindparam, case, func, select, true
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased

from dvemb.formats import Summary
from server.db.models import ApiToken, CurvePoint, ExampleTotal, Job, Run, TopKRow
from server.db.session import get_engine, get_read_engine
from server.db.states import JobStatus
from server.services import jobs, results
from server.services.auth import hash_token, project_for_token

__all__ = ["JobFacts", "curve", "ranked_examples", "top_rows"]

_JOB = (Job.id, Job.status, Job.created_at)
# Every hot read's row starts with the job's columns (_JOB), at these positions.
_ID, _STATUS, _CREATED_AT = 0, 1, 2


class JobFacts:
    """What a response needs of a succeeded job's summary."""

    def __init__(self, summary: Summary) -> None:
        self.query_sets = sorted(summary.query_sets)
        self.top_k = summary.top_k
        self.propagation = summary.propagation_label
        self.approximations = summary.approximations_json()


@lru_cache(maxsize=1024)
def job_facts(job_id: int, created_at: Any) -> JobFacts:
    """The job's summary facts (cached: a succeeded job's summary is final)."""
    with get_engine().connect() as connection:
        summary = connection.scalar(select(Job.summary).where(Job.id == job_id))
    return JobFacts(Summary.from_json(summary))


def _owned_job() -> Select[Any]:
    """The FROM clause of every hot read: the job (``:job_id``), joined to its run and to the caller's token
    (``:token_hash``), so that another project's job or a wrong token finds nothing."""
    return (
        select()
        .select_from(ApiToken)
        .join(Run, Run.project_id == ApiToken.project_id)
        .join(Job, and_(Job.run_id == Run.id, Job.id == bindparam("job_id")))
        .where(ApiToken.token_hash == bindparam("token_hash"))
    )


def _caller(token: str | None, job_id: int, query_set: str) -> dict[str, Any]:
    """The parameters every hot read binds: who asks, for which job and query set."""
    return {"job_id": job_id, "token_hash": hash_token(token or ""), "query_set": query_set}


class _Compiled:
    """A statement compiled for one dialect, as the DBAPI takes it: its SQL, its own values (literals compared
    against, JSON keys: converted once), and the conversions that the types ask for, of the caller's parameters
    and of the result's columns (by position; found from the first execution's column types, as SQLAlchemy finds
    them from each one's). On PostgreSQL today only the JSON key converts."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.dialect = dialect
        self.sql = compiled.string
        self.constants: dict[str, Any] = {}
        self.conversions: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():
            convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:  # the caller's (a bindparam without a value)
                if convert is not None:
                    self.conversions[name] = convert
            else:
                self.constants[name] = bind.effective_value if convert is None else convert(bind.effective_value)
        self.types = [column.type for column in statement.selected_columns]
        self.results: tuple[tuple[int, Callable[[Any], Any]], ...] | None = None

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        values = {**self.constants, **params}
        for name, convert in self.conversions.items():
            values[name] = convert(values[name])
        return values

    def rows(self, cursor: Any) -> list[tuple[Any, ...]]:
        found: list[tuple[Any, ...]] = cursor.fetchall()
        if self.results is None:
            described = [column[1] for column in cursor.description]  # the database's type of each column
            self.results = tuple(
                (i, convert)
                for i, (type_, code) in enumerate(zip(self.types, described, strict=True))
                if (convert := type_.dialect_impl(self.dialect).result_processor(self.dialect, code)) is not None
            )
        if not self.results:
            return found
        converted = []
        for row in found:
            values = list(row)
            for i, process in self.results:
                values[i] = process(values[i])
            converted.append(tuple(values))
        return converted


@lru_cache(maxsize=256)
def _compiled(statement: Select[Any], dialect: Dialect) -> _Compiled:
    return _Compiled(statement, dialect)


def _fetch(statement: Select[Any], params: dict[str, Any]) -> Sequence[Sequence[Any]]:
    """Run one prepared statement on a pooled connection (retried once on a connection found dead)."""
    engine = get_read_engine()
    listened = engine.dispatch.before_cursor_execute or engine.dispatch.after_cursor_execute
    if engine.dialect.name != "postgresql" or listened:
        return _fetch_through_sqlalchemy(engine, statement, params)
    compiled = _compiled(statement, engine.dialect)
    values = compiled.parameters(params)
    error = engine.dialect.loaded_dbapi.Error
    for attempt in (1, 2):
        try:
            connection = engine.raw_connection()
        except error as exc:  # as SQLAlchemy's Connection raises it (an unreachable database: 503)
            raise DBAPIError.instance(None, None, exc, error, dialect=engine.dialect) from exc
        cursor = None
        try:
            cursor = connection.cursor()
            cursor.execute(compiled.sql, values)
            return compiled.rows(cursor)
        except error as exc:
            gone = engine.dialect.is_disconnect(exc, connection, cursor)
            if gone:
                # As SQLAlchemy's Connection does on a disconnect: every connection of this one's generation is
                # recycled at its next checkout (after a restart they are all dead; the retry would take the next
                # dead one), and this one is dropped now.
                engine.pool._invalidate(connection, exc)
            if attempt == 2 or not gone:
                raise DBAPIError.instance(
                    compiled.sql, values, exc, error, connection_invalidated=gone, dialect=engine.dialect
                ) from exc
        except BaseException:
            connection.invalidate()  # interrupted mid-statement: the connection is not handed out again
            raise
        finally:
            connection.close()
    raise AssertionError("unreachable")


def _fetch_through_sqlalchemy(engine: Engine, statement: Select[Any], params: dict[str, Any]) -> Sequence[Any]:
    for attempt in (1, 2):
        try:
            with engine.connect() as connection:
                return connection.execute(statement, params).all()
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise
    raise AssertionError("unreachable")


def diagnose(token: str | None, job_id: int, query_set: str) -> JobFacts:
    """The reason a hot read found nothing, as the API's usual error (401, 404, 409), or the job's facts when
    there is simply nothing to show (an empty page, a filter matching nothing)."""
    with Session(get_engine()) as session:
        project = project_for_token(session, token=token)
        job = jobs.get_job(session, project=project, job_id=job_id)
        results.require_done(job)
        results.check_query_set(job, query_set)
        return job_facts(job.id, job.created_at)


def _facts(first: Sequence[Any], token: str | None, job_id: int, query_set: str) -> JobFacts:
    if first[_STATUS] != JobStatus.SUCCEEDED:
        return diagnose(token, job_id, query_set)  # raises the 409
    facts = job_facts(first[_ID], first[_CREATED_AT])
    results.check_query_set_among(query_set, facts.query_sets)
    return facts


@lru_cache(maxsize=64)
def _top_statement(filters: tuple[str, ...], step_min: bool, step_max: bool, kind: str) -> Select[Any]:
    """The top-k statement for one combination of filters and kind (built and compiled once per process)."""
    on = [
        TopKRow.job_id == Job.id,
        TopKRow.query_set == bindparam("query_set"),
        TopKRow.query == bindparam("query"),
        TopKRow.kind == kind,
        results.of_its_kind(TopKRow.score, kind),  # helpful rows positive, harmful rows negative
    ]
    on += [getattr(TopKRow, name) == bindparam(name) for name in filters]
    if step_min:
        on.append(TopKRow.step >= bindparam("step_min"))
    if step_max:
        on.append(TopKRow.step <= bindparam("step_max"))
    columns = (TopKRow.rank, TopKRow.score, TopKRow.step, TopKRow.epoch, TopKRow.phase, TopKRow.example_id)
    return (
        _owned_job()
        .add_columns(*_JOB, *columns, TopKRow.label, TopKRow.source, func.count(TopKRow.id).over().label("total"))
        .outerjoin(TopKRow, and_(*on))
        .order_by(TopKRow.rank)
        .offset(bindparam("offset"))
        .limit(bindparam("limit"))
    )


def top_rows(
    token: str | None,
    job_id: int,
    *,
    query_set: str,
    query: int | None,
    kind: str,
    offset: int,
    limit: int,
    step_min: int | None,
    step_max: int | None,
    phase: str | None,
    epoch: int | None,
    label: str | None,
    source: str | None,
) -> tuple[JobFacts, list[dict[str, Any]], int]:
    """(the job's facts, the page of top-k rows as dicts, the count of rows matching) in one statement."""
    filters = {"phase": phase, "epoch": epoch, "label": label, "source": source}
    given = {name: value for name, value in filters.items() if value is not None}
    statement = _top_statement(tuple(sorted(given)), step_min is not None, step_max is not None, kind)
    params = {
        **_caller(token, job_id, query_set),
        "query": -1 if query is None else query,
        "offset": offset,
        "limit": limit,
        "step_min": step_min,
        "step_max": step_max,
        **given,
    }
    found = _fetch(statement, params)
    if not found:
        return diagnose(token, job_id, query_set), [], _count_past_the_end(statement, params)
    facts = _facts(found[0], token, job_id, query_set)
    names = ("rank", "score", "step", "epoch", "phase", "example_id", "label", "source")
    rows: list[dict[str, Any]] = [dict(zip(names, r[3:11], strict=True)) for r in found if r[3] is not None]
    return facts, rows, int(found[0][-1])  # r[3]: the rank (None: no row joined); the count comes last


@lru_cache(maxsize=16)
def _examples_statement(label: bool, source: bool, helpful: bool) -> Select[Any]:
    """The caller's job with one page of its examples ranked by total influence, and how many match.

    The page is a subquery ordered as the ranking indexes are (``total``, then ``example_id`` in the same
    direction: one index serves helpful and harmful, scanned either way), so the database reads the page from the
    index, ``offset + limit`` entries, instead of sorting every example of the set (issue 25.5: a page of 20 cost
    23 ms of sorting at 100,000 examples). The count is the summary's number of examples when nothing is filtered
    (every example has a total in every query set), else a count on the filter's index.
    """
    filters = [ExampleTotal.job_id == bindparam("job_id"), ExampleTotal.query_set == bindparam("query_set")]
    if label:
        filters.append(ExampleTotal.label == bindparam("label"))
    if source:
        filters.append(ExampleTotal.source == bindparam("source"))

    def direction(column: Any) -> Any:
        return column.desc() if helpful else column.asc()

    columns = (ExampleTotal.example_id, ExampleTotal.total, ExampleTotal.occurrences, ExampleTotal.label)
    # A derived table of the job id bound as a parameter (no LATERAL: SQLite, the embedded database, has none);
    # its rows reach the answer only through the outer join on the caller's own job.
    page = (
        select(*columns, ExampleTotal.source)
        .where(*filters)
        .order_by(direction(ExampleTotal.total), direction(ExampleTotal.example_id))
        .offset(bindparam("offset"))
        .limit(bindparam("limit"))
        .subquery("page")
    )
    counted = select(func.count()).select_from(ExampleTotal).where(*filters).scalar_subquery()
    count = counted if label or source else func.coalesce(Job.summary["examples"].as_integer(), counted)
    return (
        _owned_job()
        .add_columns(*_JOB, *page.c, count.label("n"))
        .outerjoin(page, true())
        .order_by(direction(page.c.total), direction(page.c.example_id))
    )


def ranked_examples(
    token: str | None,
    job_id: int,
    *,
    query_set: str,
    kind: str,
    label: str | None,
    source: str | None,
    offset: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int]:
    """(the page of examples ranked by total influence, the count of examples matching) in one statement."""
    statement = _examples_statement(label is not None, source is not None, kind == "helpful")
    params = {
        **_caller(token, job_id, query_set),
        "label": label,
        "source": source,
        "offset": offset,
        "limit": limit,
    }
    found = _fetch(statement, params)
    if not found:
        diagnose(token, job_id, query_set)
        return [], _count_past_the_end(statement, params)
    _facts(found[0], token, job_id, query_set)
    names = ("example_id", "total", "occurrences", "label", "source")
    return [dict(zip(names, r[3:8], strict=True)) for r in found if r[3] is not None], int(found[0][-1])


def _job_steps() -> Any:
    """The job's number of steps (at least 1, as the ORM read takes it), read from its summary by the statement
    itself: an uncorrelated subquery on its own alias of the job, so the database evaluates it once, not per
    curve point."""
    alias = aliased(Job)
    steps = alias.summary["steps"].as_integer()
    return select(case((steps > 0, steps), else_=1)).where(alias.id == bindparam("job_id")).scalar_subquery()


@lru_cache(maxsize=1)
def _curve_statement() -> Select[Any]:
    points, steps = bindparam("points", type_=Integer), _job_steps()
    # Binned only when the job has more steps than points, as the ORM read decides in Python (step * points
    # stays small for short runs).
    bucket = case(
        (steps > points, results.curve_bucket(steps, points, binned=True)),
        else_=results.curve_bucket(steps, points, binned=False),
    )
    return (
        _owned_job()
        .add_columns(*_JOB, *results.curve_columns())
        .outerjoin(CurvePoint, and_(CurvePoint.job_id == Job.id, CurvePoint.query_set == bindparam("query_set")))
        .group_by(*_JOB, bucket)
        .order_by(func.min(CurvePoint.step))
    )


def curve(token: str | None, job_id: int, *, query_set: str, points: int) -> dict[str, list[Any]]:
    """The per-step curve averaged into at most ``points`` bins, in one statement (which also reads the job's
    number of steps, which the bins need)."""
    found = _fetch(_curve_statement(), {**_caller(token, job_id, query_set), "points": points})
    if not found:
        diagnose(token, job_id, query_set)
        return {name: [] for name in results.CURVE}
    _facts(found[0], token, job_id, query_set)
    rows = [r[3:] for r in found if r[3] is not None]  # no first step: the job has no curve points
    return {name: [r[i] for r in rows] for i, name in enumerate(results.CURVE)}


def _count_past_the_end(statement: Select[Any], params: dict[str, Any]) -> int:
    """The total count for a page past the end (the same statement, first page): rare, a second statement."""
    first = _fetch(statement, {**params, "offset": 0, "limit": 1})
    return int(first[0][-1]) if first else 0
