#!/usr/bin/env bash
# Session 31's diagnosis on the lent GPU: an alise / fcfs pair on chat3000 with online learning, whose step_times now
# carry the device's time and its waits for the host, then the decode kernel's time by row order.
set -uo pipefail
cd "$(dirname "$0")/../.."
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) rate=${RATE:-55} ;; *) rate=${RATE:-48} ;; esac
echo "gpu: $gpu, rate $rate, cpus: $(nproc), $(lscpu | grep "Model name" | head -1)"; nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
export PREDICTOR=predictor_880
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-400} bash bench/device/sweep.sh "D$rate" sharegpt-chat .bench-data/sharegpt_heldout_880.json 3000 \
    "${POLICIES:-alise fcfs}" "$rate" --ignore-eos --alternate --scheduler-arg=--learn-forced-lengths 2>&1 | tail -8
source bench/device/env.sh
[ -n "${ROW_ORDER:-}" ] && timeout 120 python3 -m bench.decode_row_order \
    --runs docs/results/h100_chat_2026-12-06_s30/L48/alise-r48.csv.xz --batch 256 416 448 --out "$OUT/decode_row_order.json"
for f in out/D$rate/*.json; do
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], {k: d['step_times']['worker-0'].get(k) for k in ('steps', 'mean_s', 'device_s', 'made_of', 'assignment_wait_s')}, d['normalized_latency_s']['mean'], d['admit_s']['mean'])" "$f" 2>/dev/null
done
