"""Small float64 models and helpers shared by the core tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cpu_budget(seconds): the test may use this much CPU time (all threads); its wall-clock timeout is "
        "raised, so that a loaded machine slows it down without failing it",
    )


@pytest.fixture(autouse=True)
def _cpu_budget(request: pytest.FixtureRequest) -> Iterator[None]:
    """Check a ``cpu_budget`` marker: the CPU time the test used, not the wall time a shared machine gives it."""
    marker = request.node.get_closest_marker("cpu_budget")
    started = time.process_time()
    yield
    if marker is not None:
        used, budget = time.process_time() - started, float(marker.args[0])
        assert used <= budget, f"the test used {used:.0f} s of CPU time, over its budget of {budget:.0f} s"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture(autouse=True)
def _float64_and_seed() -> Iterator[None]:
    """Exactness tests run in float64; the default dtype is restored for other test packages."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
