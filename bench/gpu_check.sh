#!/usr/bin/env bash
# The GPU checks of the recorder and the engine, for a machine with a CUDA device, in under ten minutes:
# the gpu-marked tests (CUDA equals CPU, bf16 autocast), then the device timings (bench/gpu_timings.py).
# Needs a Python environment with a CUDA build of torch and this project installed (the suite itself
# passes without a GPU: these tests are skipped there). Run from the repository root:
#     bash bench/gpu_check.sh            # PYTHON=... to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/core
timeout 240 "$PY" -m bench.gpu_timings
