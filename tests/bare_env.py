"""The environment of a test's subprocess that runs a script as a user would (no inherited settings)."""

from __future__ import annotations

import os


def bare_env(pythonpath: str) -> dict[str, str]:
    """Only ``PYTHONPATH``, a system ``PATH`` and the suite's share of the cores for math threads (tests/conftest.py:
    at their default, two test processes on two cores each ran two spinning OpenMP threads)."""
    threads = {name: os.environ[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ}
    return {"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin", **threads}
