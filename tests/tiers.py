"""The suite's tiers (issue 26), as the root conftest assigns them: see tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

TIERS = {
    "core": "the fast tier: library, engine, integrations (no database, broker or browser)",
    "service": "the service on real PostgreSQL, Redis and Celery workers, and the demo end to end",
    "browser": "the dashboard in headless Chromium",
}
#: Top-level test files that run the service (the rest of tests/*.py is core).
SERVICE_FILES = {"test_demo.py"}
HERE = Path(__file__).resolve().parent


def tier_of(path: Path, fixtures: list[str]) -> str:
    """The tier of a test in ``path`` (a file under tests/) that uses ``fixtures``."""
    if "browser" in fixtures:
        return "browser"
    parts = path.resolve().relative_to(HERE).parts
    if parts[0] == "service" or (len(parts) == 1 and parts[0] in SERVICE_FILES):
        return "service"
    return "core"
