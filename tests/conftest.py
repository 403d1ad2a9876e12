"""The suite's tiers (issue 26): each test gets exactly one marker from where it lives and what it uses, so
that ``pytest -m core`` runs the fast tier alone (the library, the engine and the integrations: no database,
broker or browser) and CI runs them all (README, "Development").

- ``core``: tests/core, tests/integrations and the top-level checks of examples and deployment files;
- ``service``: the service against real PostgreSQL, Redis and Celery workers (tests/service), and the demo end
  to end;
- ``browser``: the dashboard in headless Chromium (any test that uses the ``browser`` fixture).
"""

from __future__ import annotations

import os

import pytest

from tests.tiers import TIERS, tier_of

#: Files whose tests take longest (seconds of wall time each in a run of the suite in two processes, from the
#: per-test durations: 80 s for the first down to 21 s for the last), started first so that the suite's two
#: processes (scripts/test.sh: ``-n 2 --dist loadfile --no-loadscope-reorder``, one file per process at a time)
#: finish together instead of one running a long file alone at the end. pytest-xdist orders files by their number of
#: tests unless told not to. Order only: every test runs either way.
SLOW_FILES_FIRST = (
    "tests/service/test_embedded.py",
    "tests/service/test_dashboard_views.py",
    "tests/service/test_jobs.py",
    "tests/test_demo.py",
    "tests/service/test_dashboard_legible.py",
    "tests/core/test_fidelity.py",
    "tests/service/test_segments_on_a_bucket.py",
    "tests/service/test_replay_jobs.py",
    "tests/integrations/test_huggingface.py",
    "tests/service/test_client.py",
    "tests/service/test_segmented_jobs.py",
    "tests/service/test_uploads.py",
    "tests/service/test_validation_recovery.py",
    "tests/service/test_fuzz.py",
    "tests/service/test_broker_outage.py",
)


def threads_per_process(cores: int, processes: int) -> int:
    """Math-library threads for each of ``processes`` test processes sharing ``cores``: the cores split between
    them, at least one each."""
    return max(1, cores // max(1, processes))


def share_the_cores() -> None:
    """Each pytest-xdist process (and everything it starts: Celery workers, the demo, training subprocesses, which
    inherit the environment) uses its share of the cores for PyTorch's and BLAS's thread pools. Left at their
    default, two processes on two cores each run two OpenMP threads whose waits spin: the quick demo measured 93 s of
    CPU against 45 s with one thread, for the same findings. A value set by hand is kept."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if processes <= 1:
        return
    threads = str(threads_per_process(os.cpu_count() or 1, processes))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    import torch  # after the environment: a pool already started takes the count from set_num_threads

    chosen = os.environ["OMP_NUM_THREADS"]
    torch.set_num_threads(int(chosen) if chosen.isdigit() and int(chosen) > 0 else int(threads))


def pytest_configure(config: pytest.Config) -> None:
    share_the_cores()
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: tier, {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item.path, list(getattr(item, "fixturenames", [])))))
    first = {name: rank for rank, name in enumerate(SLOW_FILES_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: first.get(item.path.relative_to(root).as_posix(), len(first)))  # stable
