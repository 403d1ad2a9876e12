#!/usr/bin/env bash
# The second README command: sets everything up, then runs lint, type checks, architecture rules
# and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
bash scripts/check.sh
.venv/bin/python -m pytest "$@"
