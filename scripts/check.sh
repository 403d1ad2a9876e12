#!/usr/bin/env bash
# Lint, type check and architecture rules; run by scripts/test.sh before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check dvemb server worker migrations demo examples tests bench
.venv/bin/ruff format --check dvemb server worker migrations demo examples tests bench
.venv/bin/mypy -n "$(nproc)"  # parallel workers: 84 s to 33 s on a fresh clone on 2 cores
.venv/bin/lint-imports
# Manifests and summaries are read through their typed objects outside the modules that parse them (issue 26).
.venv/bin/python scripts/check_typed_access.py
# The dashboard compares statuses with frontend/js/statuses.js, written from dvemb/formats/statuses.py (issue 26).
.venv/bin/python scripts/write_statuses_js.py --check
# BENCHMARKS.md's digest is what its sections say (bench/markdown.py), never edited by hand.
.venv/bin/python -m bench.digest --check
# The dashboard's JavaScript (frontend/): Prettier's formatting and ESLint, as pinned in frontend/package-lock.json.
if command -v npx >/dev/null 2>&1; then
    if [ ! -x frontend/node_modules/.bin/eslint ] || [ ! -x frontend/node_modules/.bin/prettier ]; then
        echo "error: Prettier/ESLint are not installed in frontend/node_modules: run scripts/setup.sh" >&2
        exit 1
    fi
    npx --no --prefix frontend prettier --check --ignore-path frontend/.prettierignore frontend
    npx --no --prefix frontend eslint --config frontend/eslint.config.js frontend
else
    echo "warning: npx is missing: skipping the frontend's lint (Prettier, ESLint)" >&2
fi
