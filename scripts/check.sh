#!/usr/bin/env bash
# Lint, type check and architecture rules; run by scripts/test.sh before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check dvemb server worker migrations demo examples tests bench
.venv/bin/ruff format --check dvemb server worker migrations demo examples tests bench
.venv/bin/mypy
.venv/bin/lint-imports
