#!/usr/bin/env bash
# The main job: decode the embedded default model with ar, sjd and pjd (PNG grid + JSON + table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/pjd demo --out out/demo "$@"
