#!/usr/bin/env bash
# Sets up the recorder benchmark's own virtual environment in bench/.venv-bench (git-ignored):
# the CPU build of PyTorch first (pinned, so that no CUDA build is pulled), then dvemb from this
# checkout with scikit-learn, transformers and accelerate, then the peer libraries dattri and
# bergson (EleutherAI; its Trainer callback is the peer of bench/trainer_overhead.py). Idempotent.
#
# If a peer cannot be installed, the script still succeeds: the benchmarks then report that peer
# as unavailable, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=bench/.venv-bench
TORCH_PIN="torch==2.13.0"   # the CPU wheel on this machine's disk; an unpinned torch downloads a CUDA build
DATTRI_PIN="dattri==0.3.0"
BERGSON_PIN="bergson==2.5.1"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet "$TORCH_PIN"
# torch is repeated on each line below so that no dependency can replace it.
"${PIP[@]}" install --quiet "$TORCH_PIN" -e . "scikit-learn>=1.4" transformers accelerate
if "${PIP[@]}" install --quiet "$TORCH_PIN" "$DATTRI_PIN"; then
    if ! "$VENV/bin/python" -c "from dattri.algorithm.dvemb import DVEmbAttributor" 2>"$VENV/dattri-import-error"; then
        echo "setup.sh: dattri installed but does not import (see $VENV/dattri-import-error); the benchmark will report it" >&2
    fi
else
    echo "setup.sh: could not install $DATTRI_PIN; the benchmark will report the peer as unavailable" >&2
fi
if "${PIP[@]}" install --quiet "$TORCH_PIN" "$BERGSON_PIN"; then
    # bergson requires torchvision and torchaudio but never imports them; the PyPI wheels pip picks
    # are built against the CUDA torch and fail to load next to the CPU one ("operator
    # torchvision::nms does not exist"), and transformers imports torchvision whenever it is
    # installed, so they are removed again.
    "${PIP[@]}" uninstall --quiet --yes torchvision torchaudio
    if ! "$VENV/bin/python" -c "from bergson.huggingface import GradientCollectorCallback" 2>"$VENV/bergson-import-error"; then
        echo "setup.sh: bergson installed but does not import (see $VENV/bergson-import-error); bench/trainer_overhead.py will report it" >&2
    fi
else
    echo "setup.sh: could not install $BERGSON_PIN; bench/trainer_overhead.py will report the peer as unavailable" >&2
fi
"$VENV/bin/python" -c "import torch, dvemb; print('bench venv ready: torch', torch.__version__, '| dvemb', dvemb.__version__)"
