#!/usr/bin/env bash
# One command for a GPU machine without network: install pjd on the machine's own python3 (no deps,
# no build isolation, the CUDA extension built with its nvcc), then test and time it stage by stage
# (env, parity, step, kernels, e2e, demo), each with a time cap, no stage starting after BUDGET_S
# (450 s) and all done by HARD_S (530 s). Always writes $OUT/summary.json, summary.md, log.txt and
# raw.tar.gz (OUT defaults to out/gpu_check) and prints summary.md last.
#   bash scripts/gpu_check.sh                          # everything
#   STAGES=parity,step bash scripts/gpu_check.sh       # re-run chosen stages (INSTALL=0: skip the install)
#   DRY=1 bash scripts/gpu_check.sh                    # dry run (what happens anyway without CUDA)
# PYTHON selects the interpreter (default python3). The driver is scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
export OUT=${OUT:-out/gpu_check}
PYTHON=${PYTHON:-python3}
export PYTHON HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
"$PYTHON" scripts/gpu_check.py --out "$OUT" --start "$START" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo
if [ -f "$OUT/summary.md" ]; then cat "$OUT/summary.md"; else echo "gpu_check: no summary was written (exit $rc)"; fi
exit "$rc"
