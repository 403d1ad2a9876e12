#!/usr/bin/env bash
# The second README command: sets everything up, then runs lint, type checks, architecture rules
# and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# The static checks (ruff, mypy from cold: about a minute, import rules, the frontend's lint) run beside the tests
# instead of before them; either failing fails the run, the checks' output printed at the end.
check_log="$(mktemp)"
bash scripts/check.sh >"$check_log" 2>&1 &
check_pid=$!
set +e
# Two processes (pytest-xdist), one test file each at a time: much of the suite waits on its Celery workers, API
# servers and browser, so two overlap on two cores (DVEMB_TEST_PROCESSES=1 runs it in one process). Each process
# makes its own PostgreSQL database and claims its own Redis database (tests/service/service_harness.py).
processes="${DVEMB_TEST_PROCESSES:-2}"
if [ "$processes" -gt 1 ]; then
    .venv/bin/python -m pytest -n "$processes" --dist loadfile "$@"
else
    .venv/bin/python -m pytest "$@"
fi
tests=$?
wait "$check_pid"
checks=$?
set -e
echo "--- scripts/check.sh (ruff, mypy, import rules, typed access, statuses.js, frontend lint):"
cat "$check_log"
rm -f "$check_log"
if [ "$checks" -ne 0 ]; then
    echo "error: scripts/check.sh failed (exit $checks): see its output above" >&2
    exit "$checks"
fi
exit "$tests"
