#!/usr/bin/env bash
# The first README command: sets everything up, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dvemb demo "$@"
