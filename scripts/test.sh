#!/usr/bin/env bash
# The test suite (what CI runs). pytest exits 5 when it collects no test: that is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# worksteal: a worker that runs out of tests takes half of the other's queue (tests take 0.01 s to minutes).
exec .venv/bin/python -m pytest -n 2 --dist worksteal -q tests "$@"
