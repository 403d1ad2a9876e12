"""docker-compose.yml stays in step with the code (CI has no Docker engine to run it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from server.settings import Settings

ROOT = Path(__file__).parent.parent
# What obstore reads to reach the bucket (server/storage/objects.py).
S3_VARIABLES = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"}


def test_compose_file_matches_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "minio", "bucket", "migrate", "api", "worker"}
    fields = {f"DVEMB_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        dvemb = {key for key in env if key.startswith("DVEMB_")}
        assert dvemb <= fields, f"{name}: unknown settings {dvemb - fields}"
        assert set(env) - dvemb <= S3_VARIABLES, f"{name}: unknown variables {set(env) - dvemb - S3_VARIABLES}"
        assert env["DVEMB_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["DVEMB_BROKER_URL"].startswith("redis://")
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["command"][:2] == ["uvicorn", "server.main:app"]
    assert services["worker"]["command"][:2] == ["dvemb", "worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("api", "worker"):
        # Logs and results in the bucket: no volume shared by the API and the workers (issue 25.1).
        assert "volumes" not in services[name]
        env = services[name]["environment"]
        assert env["DVEMB_STORAGE_URL"] == "s3://dvemb/storage" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert "local/dvemb" in services["bucket"]["command"][0]
    assert all("healthcheck" in services[name] for name in ("postgres", "redis", "minio", "api", "worker"))
    assert (ROOT / "Dockerfile").exists()


def test_the_image_holds_every_package_and_the_dashboard() -> None:
    """Every package the distribution declares (entry points included) and the dashboard's files are copied
    into the image; the lint tools' node_modules are not."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    assert "frontend" in copied
    assert "frontend/node_modules" in (ROOT / ".dockerignore").read_text().split()


def _default(value: str) -> int:
    """The default of a compose value written ``${NAME:-default}`` (or the value itself)."""
    return int(value.split(":-")[1].rstrip("}")) if value.startswith("${") else int(value)


def test_the_api_processes_pools_fit_under_the_databases_connections() -> None:
    """Every API process may hold 2 x (pool size + overflow) PostgreSQL connections (server/db/session.py): the
    compose file's API processes together, with room for the workers and the migration, stay under the
    max_connections its PostgreSQL starts with (docs/service.md, "Database connections")."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api = services["api"]
    processes = int(api["command"][api["command"].index("--workers") + 1])
    env = api["environment"]
    per_process = 2 * (_default(env["DVEMB_DATABASE_POOL_SIZE"]) + _default(env["DVEMB_DATABASE_MAX_OVERFLOW"]))
    command = services["postgres"]["command"]
    limit = int(next(c.split("=")[1] for c in command if c.startswith("max_connections=")))
    workers_room = 4 * 10  # `--scale worker=4` as the file suggests, a few connections per worker process
    assert processes * per_process + workers_room <= limit, (processes, per_process, limit)
