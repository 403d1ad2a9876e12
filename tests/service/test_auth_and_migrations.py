"""Authentication and project isolation; migrations on PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic import command
from service_harness import Api, make_token
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from dvemb.formats.statuses import RunStatus
from server.db.models import LogFile, Project, Run
from server.migrate import alembic_config, downgrade, upgrade


def test_auth(server_url: str, api: Api) -> None:
    assert httpx.get(f"{server_url}/api/v1/health").status_code == 200
    missing = httpx.get(f"{server_url}/api/v1/runs")
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    wrong = httpx.get(f"{server_url}/api/v1/runs", headers={"Authorization": "Bearer dvemb_nope"})
    assert wrong.status_code == 401
    run_id = api.post("/runs", json={"name": "mine"}).json()["id"]
    other = Api(server_url, make_token("another project"))
    try:
        assert other.get(f"/runs/{run_id}").status_code == 404
        assert other.delete(f"/runs/{run_id}").status_code == 404
        assert other.get("/runs").json()["count"] == 0
    finally:
        other.client.close()
    assert api.get("/runs", params={"search": "MIN"}).json()["count"] == 1
    assert api.post("/runs", json={"name": "mine"}).status_code == 409
    assert api.post("/runs", json={"name": ""}).status_code == 422
    schema = httpx.get(f"{server_url}/api/v1/openapi.json").json()
    assert "/api/v1/runs/{run_id}/uploads" in schema["paths"]


def _check_round_trip(url: str) -> None:
    upgrade(url)
    command.check(alembic_config(url))  # models and migrations agree
    downgrade(url, "base")
    upgrade(url)
    command.check(alembic_config(url))


def test_migrations_postgres(service_env: dict[str, str]) -> None:
    _check_round_trip(service_env["DVEMB_DATABASE_URL"])


def test_migrations_sqlite(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite:///{tmp_path / 'dvemb.db'}")


def test_migration_0009_gives_a_validating_file_a_full_lease(tmp_path: Path) -> None:
    """A file 'validating' when 0009 runs got an expired lease: during a rolling deploy, the reconciler queued
    it again at once while an old validator (no claim check) still worked on it. It gets a full default lease."""
    url = f"sqlite:///{tmp_path / 'dvemb.db'}"
    upgrade(url, "0008")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', CURRENT_TIMESTAMP)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, project_id, name, status, size_bytes, created_at) "
                    "VALUES (1, 1, 'r', 'uploading', 0, CURRENT_TIMESTAMP)"
                )
            )
            for file_id, status in enumerate(["validating", "received"], 1):
                conn.execute(
                    text(
                        'INSERT INTO log_files (id, run_id, name, upload_id, size_bytes, "offset", status, created_at) '
                        "VALUES (:id, 1, :name, :name, 10, 10, :status, CURRENT_TIMESTAMP)"
                    ),
                    {"id": file_id, "name": f"f{file_id}", "status": status},
                )
        before = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # SQLite keeps UTC without its zone
        upgrade(url)
        with engine.connect() as conn:
            leases = dict(conn.execute(select(LogFile.id, LogFile.lease_expires_at)).all())
    finally:
        engine.dispose()
    assert leases[2] is None
    assert before + dt.timedelta(seconds=29) < leases[1] < before + dt.timedelta(seconds=60), leases


def test_job_needs_a_ready_run(api: Api) -> None:
    run_id = api.post("/runs", json={"name": "empty"}).json()["id"]
    response = api.post(f"/runs/{run_id}/jobs", json={})
    assert response.status_code == 409 and "manifest.json" in response.json()["detail"]
    with pytest.raises(AssertionError):
        assert api.get("/jobs/999").status_code != 404


def test_tokens_api(server_url: str, api: Api) -> None:
    project = api.get("/project").json()
    assert project["name"] == "test" and len(project["tokens"]) == 1
    assert "token_hash" not in project["tokens"][0]
    created = api.post("/tokens", json={"name": "ci"})
    assert created.status_code == 201
    second = Api(server_url, created.json()["token"])
    try:
        assert second.get("/project").json()["id"] == project["id"]
        first_id = project["tokens"][0]["id"]
        assert second.delete(f"/tokens/{first_id}").status_code == 204
        assert api.get("/project").status_code == 401  # the revoked token no longer works
        last = second.get("/project").json()["tokens"][0]["id"]
        assert second.delete(f"/tokens/{last}").status_code == 409
    finally:
        second.client.close()


def test_two_tokens_revoking_each_other_leave_one(service_env: dict[str, str]) -> None:
    """Issue 13, item 9: A revokes B's token while B revokes A's. B's revocation waits on the project's row
    until A commits, then finds B's own token the last one and is refused; before, both went through."""
    from server.db.models import ApiToken
    from server.db.session import session_factory
    from server.errors import Conflict
    from server.services.auth import get_or_create_project, revoke_token

    factory = session_factory()
    with factory() as setup:
        project = get_or_create_project(setup, name="race")
        setup.commit()
        make_token("race")
        make_token("race")
        first, second = setup.scalars(select(ApiToken.id).where(ApiToken.project_id == project.id)).all()
        setup.commit()
    outcome: list[str] = []

    def revoke_second() -> None:
        with factory() as other:
            try:
                revoke_token(other, project=other.merge(project), token_id=first)
                other.commit()
                outcome.append("revoked")
            except Conflict:
                outcome.append("conflict")

    with factory() as session:
        revoke_token(session, project=session.merge(project), token_id=second)  # holds the project's row
        racer = threading.Thread(target=revoke_second)
        racer.start()
        time.sleep(0.5)
        assert not outcome  # waiting on the lock, not deciding from a stale count
        session.commit()
    racer.join(10)
    assert outcome == ["conflict"]
    with factory() as check:
        assert check.scalars(select(ApiToken.id).where(ApiToken.project_id == project.id)).all() == [first]


def test_request_bodies_are_capped(api: Api) -> None:
    """Issue 13, item 10: a 96 MB body cost 500 MB of API memory. Over DVEMB_MAX_REQUEST_BYTES (32 MiB) it is a
    413 before the body is read (Content-Length) or as soon as it streams past the limit (chunked)."""
    big = b'{"name": "' + b"x" * (33 << 20) + b'"}'
    declared = api.client.post("/runs", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    streamed = api.client.post("/runs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "DVEMB_MAX_REQUEST_BYTES" in streamed.json()["detail"]
    assert api.get("/runs").json()["count"] == 0
    assert api.post("/runs", json={"name": "small"}).status_code == 201


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_status_columns_hand_out_their_enum_and_refuse_other_values(
    database: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    """The status columns (server/db/status_column.py) store the same strings as before (no migration), read back as
    the enum's members, and refuse a value outside the enum before anything is written (issue 26)."""
    url = service_env["DVEMB_DATABASE_URL"] if database == "postgres" else f"sqlite:///{tmp_path / 'dvemb.db'}"
    if database == "sqlite":
        upgrade(url)
    engine = create_engine(url)
    name = f"typed-{uuid.uuid4().hex[:8]}"
    try:
        with Session(engine) as session, session.begin():
            project = Project(name=name)
            session.add(project)
            session.flush()
            project_id = project.id
            session.add(Run(project_id=project_id, name="r", status="ready"))
        with engine.connect() as conn:  # stored as the plain string
            stored = conn.execute(text("SELECT status FROM runs WHERE project_id = :p"), {"p": project_id}).scalar()
        assert stored == "ready" and type(stored) is str
        with Session(engine) as session:
            run = session.scalars(select(Run).where(Run.project_id == project_id)).one()
            assert run.status is RunStatus.READY
            run.status = "finished"  # type: ignore[assignment]  (what a typo would do)
            with pytest.raises(StatementError, match="'finished' is not a RunStatus: one of created, uploading, ready"):
                session.commit()
            session.rollback()
            assert session.scalars(select(Run.status).where(Run.project_id == project_id)).one() is RunStatus.READY
    finally:
        engine.dispose()
