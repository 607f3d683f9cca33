#!/usr/bin/env bash
# Session 32 on the lent GPU, for the next one: why decode steps of more rows than the batch (the 448-row graph) cost
# ~3.5 ms more than their rows say: cuBLAS's projection GEMMs at each bucket size (bench/decode_bucket_gemm.py);
# with ORDER=1 the decode attention of live batches by row order (bench/decode_batch_order.py, measured in session
# 32); with PRED_THREADS=1 the predictor's math threads under a paced load (bench/predictor_threads.py, no GPU
# needed); then alise at RATE, alise with 8 early rows instead of 32 (alise@er8: in simulation it never crosses into
# the 448-row graph and has the lower mean), and fcfs, the same arrivals (alise@g: rows sharing prefix blocks grouped;
# NAME: the sweep's folder under out/; POLICIES, N), each run's decode-only steps against session 30's fitted cost
# (device time over modelled) and where its waits were.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/device/machine.sh
source bench/device/env.sh      # the bundle, the wheels, PYTHONPATH (run_summary imports bench)
PYTHONPATH=$PWD timeout 120 python3 -m bench.decode_bucket_gemm --out "$OUT/decode_bucket_gemm.json" 2>&1 \
    | grep -v Warning
if [ -n "${PRED_THREADS:-}" ]; then
    timeout 150 python3 -m bench.predictor_threads --threads 1 4 16 --seconds 20
fi
if [ -n "${ORDER:-}" ]; then
    PYTHONPATH=$PWD timeout 150 python3 -m bench.decode_batch_order time \
        --batches docs/results/h100_chat_2026-12-06_s32/batches.json --out "$OUT/decode_batch_order.json" 2>&1 \
        | grep -v Warning
fi
export PREDICTOR=predictor_880
# a variant (policy@variant) is the same policy with its own worker flags, a run of its own in the same sweep
name=${NAME:-E3}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-420} bash bench/device/sweep.sh "$name" sharegpt-chat \
    .bench-data/sharegpt_heldout_880.json "${N:-3000}" "${POLICIES:-alise alise@er8 fcfs}" "$rate" --ignore-eos \
    --scheduler-arg=--learn-forced-lengths --variant-worker-arg=g=--group-prefix-rows \
    --variant-worker-arg=er8=--early-rows=8 2>&1 | tail -3
python3 bench/device/run_summary.py out/"$name"/*-r*.json
