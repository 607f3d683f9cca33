#!/usr/bin/env bash
# Session 31's diagnosis on the lent GPU: an alise / fcfs pair (POLICIES) on chat3000 with online learning, whose
# step_times carry the device's time, its waits for the host and where placed jobs waited; with ROW_ORDER=1, then the
# decode kernel's time by row order. The machine's CPUs and GPU clocks are printed first.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/device/machine.sh
export PREDICTOR=predictor_880
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-400} bash bench/device/sweep.sh "D$rate" sharegpt-chat \
    .bench-data/sharegpt_heldout_880.json 3000 "${POLICIES:-alise fcfs}" "$rate" --ignore-eos --alternate \
    --scheduler-arg=--learn-forced-lengths 2>&1 | tail -8
source bench/device/env.sh
[ -n "${ROW_ORDER:-}" ] && timeout 120 python3 -m bench.decode_row_order --batch 256 416 448 \
    --runs docs/results/h100_chat_2026-12-06_s30/L48/alise-r48.csv.xz --out "$OUT/decode_row_order.json"
for f in out/D$rate/*.json; do
    python3 - "$f" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
steps = d["step_times"]["worker-0"]
print(sys.argv[1], {k: steps.get(k) for k in ("steps", "mean_s", "device_s", "made_of", "assignment_wait_s")},
      d["normalized_latency_s"]["mean"], d["admit_s"]["mean"])
PY
done
