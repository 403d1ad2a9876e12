#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: a virtual environment in .venv with the
# CPU build of PyTorch (installed first, so that no CUDA build is pulled) and the project with its
# development extras. Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Debian's Chromium for the dashboard's browser tests (Playwright drives it; never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    else
        echo "warning: /usr/bin/chromium is missing and we are not root: the browser tests will fail" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build lies on this machine's disk; an unpinned torch would download a CUDA build of several GB.
.venv/bin/python -m pip install --quiet --no-compile "torch==2.13.0"
.venv/bin/python -m pip install --quiet --no-compile "torch==2.13.0" -e ".[dev,client,server,huggingface]"
# Bytecode: pip installs without compiling (--no-compile: it compiles one file at a time, 92 s of CPU here for
# 19,000 files, most never imported). Python then writes each module's bytecode the first time it is imported, except
# where PYTHONDONTWRITEBYTECODE is set (as on these machines), where every process would compile torch again (import
# 4.1 s against 1.9 s of CPU): there, and only there, everything installed is compiled now, on all cores.
# scripts/test.sh unsets it for the suite, whose processes then compile what they import once. As pip does, a file
# this Python cannot compile is skipped (torch ships test helpers written for Python 3.12): -qq, and its status is
# not an error.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
    .venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
fi
# Prettier and ESLint for the dashboard, exactly as frontend/package-lock.json pins them (scripts/check.sh runs
# them). `npm ci` runs only when the lock file changed since the last install; skipped where npm is missing.
if command -v npm >/dev/null 2>&1; then
    lock_sum=$(sha256sum frontend/package-lock.json | cut -d' ' -f1)
    if [ "$(cat frontend/node_modules/.installed-lock.sha256 2>/dev/null)" != "$lock_sum" ]; then
        npm ci --prefix frontend --no-audit --no-fund --loglevel=error </dev/null >/dev/null
        echo "$lock_sum" >frontend/node_modules/.installed-lock.sha256
    fi
else
    echo "warning: npm is missing: scripts/check.sh will skip the frontend's lint (Prettier, ESLint)" >&2
fi
