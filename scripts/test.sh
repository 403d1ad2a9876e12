#!/usr/bin/env bash
# The second README command: sets everything up, then runs lint, type checks, architecture rules
# and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Python writes each module's bytecode when it is first imported, so the suite's processes compile what they import
# once (about 1,300 modules for torch, transformers, celery, fastapi and sqlalchemy: 4.7 s of CPU) instead of set-up
# compiling all 19,000 installed files up front (43 s on two cores) or every process compiling torch again.
unset PYTHONDONTWRITEBYTECODE
bash scripts/setup.sh
bash scripts/services.sh
bash scripts/check.sh
# Two processes (pytest-xdist), one test file each at a time: much of the suite waits on its Celery workers, API
# servers and browser, so two overlap on two cores (DVEMB_TEST_PROCESSES=1 runs it in one process). Each process
# makes its own PostgreSQL database and claims its own Redis database (tests/service/service_harness.py), and uses
# its share of the cores' math threads (tests/conftest.py). The files that take longest go first, in the order
# tests/conftest.py gives (--no-loadscope-reorder: xdist would order them by their number of tests). Three
# processes on two cores were no faster (647 s against 626 s), and a replay test lost its lease once under that load.
processes="${DVEMB_TEST_PROCESSES:-2}"
if [ "$processes" -gt 1 ]; then
    .venv/bin/python -m pytest -n "$processes" --dist loadfile --no-loadscope-reorder "$@"
else
    .venv/bin/python -m pytest "$@"
fi
