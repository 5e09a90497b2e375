#!/usr/bin/env bash
# The GPU machine's software stack on this (GPU-less) machine: a second virtualenv OUTSIDE the repo
# with torch 2.11.0 (PyPI's CUDA 13.0 build and its nvidia-* libraries, about 3 GB: the CUDA build is
# what the GPU machine has, and it will not import without them), triton 3.6.0, transformers 5.17.0
# and numpy 2.5; pjd installed into it as on that machine (--no-deps --no-build-isolation -e .,
# the CUDA extension built with this machine's nvcc). Then the two checks that differ between triton
# 3.6 and our pinned 3.9: the dry-run gate (every kernel variant spill-free for sm_80 / sm_90) and the
# interpreter parity tests. CI keeps one environment (.venv, triton 3.9); run this when a kernel's tile
# configs or code change.
#   bash scripts/device_stack_gate.sh                 # env in ../venv-device-stack (VENV=... to move it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-../venv-device-stack}
PY312=${PY312:-python3.12}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy==2.5.*' \
    'huggingface-hub<2' pillow safetensors tqdm pytest ninja setuptools wheel
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
"$VENV/bin/python" -c "import triton; from pjd.kernels import draft_attention as d, _launch; print('tile configs: the triton %d.%d table' % _launch.tuned_for(d.TILE_TABLES, triton.__version__))"
"$VENV/bin/python" benchmarks/kernel_report.py --summary
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_draft_attention.py tests/test_speculative_verify.py tests/test_dryrun.py
