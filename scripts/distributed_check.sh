#!/usr/bin/env bash
# The issue-16 acceptance run on CPU: N images of a model decoded (1) by one process and (2) by a
# 2-rank torchrun (Gloo, loopback) that is killed midway and resumed; every file must be
# byte-identical; then `pjd eval` (2 ranks) prints FID and class accuracy.
#
#   bash scripts/distributed_check.sh [N] [MODEL] [OUT] [KILL_AFTER_IMAGES]   (defaults: 300 default out/dist_check N/3)
# Extra `pjd sample` flags go in $SAMPLE_ARGS (default: --method pjd --batch-size 16 --seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300}
MODEL=${2:-default}
OUT=${3:-out/dist_check}
KILL_AFTER=${4:-$((N / 3))}
SAMPLE_ARGS=${SAMPLE_ARGS:---method pjd --batch-size 16 --seed 0}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo
port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
torchrun2() { "$PY" -m torch.distributed.run --nproc-per-node 2 --nnodes 1 --master-addr 127.0.0.1 \
  --master-port "$(port)" -m pjd.cli "$@"; }

rm -rf "$OUT" && mkdir -p "$OUT"
echo "== one process"
# shellcheck disable=SC2086
"$PY" -m pjd.cli sample --model "$MODEL" -n "$N" --out "$OUT/single" --no-progress $SAMPLE_ARGS

echo "== 2 ranks, killed after $KILL_AFTER images"
# A preemption: SIGKILL to the launcher and its two ranks (which torchrun starts in their own sessions).
# shellcheck disable=SC2086
"$PY" -m torch.distributed.run --nproc-per-node 2 --nnodes 1 --master-addr 127.0.0.1 --master-port "$(port)" \
  -m pjd.cli sample --model "$MODEL" -n "$N" --out "$OUT/ranks" --no-progress $SAMPLE_ARGS &
launcher=$!
while [ "$(find "$OUT/ranks/images" -name '*.png' 2>/dev/null | wc -l)" -lt "$KILL_AFTER" ]; do sleep 0.2; done
# shellcheck disable=SC2046
kill -KILL $(pgrep -P "$launcher") "$launcher"
wait "$launcher" 2>/dev/null || true
echo "interrupted with $(find "$OUT/ranks/images" -name '*.png' | wc -l) of $N images on disk"

echo "== 2 ranks, resumed"
# shellcheck disable=SC2086
torchrun2 sample --model "$MODEL" -n "$N" --out "$OUT/ranks" --no-progress $SAMPLE_ARGS

echo "== compare"
diff -r "$OUT/single/images" "$OUT/ranks/images" && cmp "$OUT/single/manifest.json" "$OUT/ranks/manifest.json" \
  && cmp "$OUT/single/samples.npz" "$OUT/ranks/samples.npz" && echo "identical: $N PNGs, manifest.json, samples.npz"

if [ "$MODEL" = default ]; then
  echo "== eval (2 ranks)"
  torchrun2 eval "$OUT/ranks"
fi
