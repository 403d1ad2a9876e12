"""docker-compose.yml stays in step with the code (CI has no Docker engine to run it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from server.settings import Settings

ROOT = Path(__file__).parent.parent


def test_compose_file_matches_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    fields = {f"DVEMB_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= fields, f"{name}: unknown settings {set(env) - fields}"
        assert env["DVEMB_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["DVEMB_BROKER_URL"].startswith("redis://")
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["command"][:2] == ["uvicorn", "server.main:app"]
    assert services["worker"]["command"][:2] == ["dvemb", "worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("api", "worker"):
        assert "data:/data" in services[name]["volumes"]  # one storage volume shared by API and workers
    assert all("healthcheck" in services[name] for name in ("postgres", "redis", "api", "worker"))
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
