#!/usr/bin/env bash
# Session 33 on the lent GPU: decode graphs timed by bucket (a bucket whose graph is slower than a larger one's
# replays the larger: bench/decode_graph_buckets.py prints each graph's time, the route, and steps of real contexts
# on the routed graph against their own, logits checked), then alise, alise with 8 early rows (alise@er8) and fcfs at
# RATE on the same arrivals (POLICIES, NAME, N; alise@nt: without the timing, as before session 33), each run's
# decode steps' device time against session 30's fitted cost, and the route each run's worker logged. A machine
# whose CPU side lags stops the call after its first run (MAX_ADMIT_S). NO_BUCKETS=1: the sweep only.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/device/machine.sh
if [ -z "${NO_BUCKETS:-}" ]; then
    source bench/device/env.sh
    timeout 200 python3 -m bench.decode_graph_buckets --out "$OUT/decode_graph_buckets.json" 2>&1 | grep -v Warning
fi
export PREDICTOR=predictor_880
name=${NAME:-F}
# one policy at a time (a sweep's --resume keeps the runs done): after each, a machine whose requests take longer
# than MAX_ADMIT_S to get in (its CPU side lags, session 33) stops the call, its device time kept for a better one
for policy in ${POLICIES:-alise alise@er8 fcfs}; do
    SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-170} bash bench/device/sweep.sh "$name" sharegpt-chat \
        .bench-data/sharegpt_heldout_880.json "${N:-3000}" "$policy" "${RATES:-$rate}" \
        --ignore-eos --scheduler-arg=--learn-forced-lengths --variant-worker-arg=er8=--early-rows=8 \
        --variant-worker-arg=nt=--no-timed-graph-buckets 2>&1 | tail -2
    for run in out/"$name/$policy"-r*.json; do
        python3 bench/device/run_summary.py --max-admit-s "${MAX_ADMIT_S:-0.3}" "$run" \
            || { echo "this machine lags ($run: admission past ${MAX_ADMIT_S:-0.3} s): stopping"; break 2; }
    done
done
python3 bench/device/run_summary.py out/"$name"/*-r*.json
grep -h "replay the" out/"$name"/stack-*/worker-0.log | sort | uniq -c
