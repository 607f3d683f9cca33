#!/usr/bin/env bash
# One policy sweep on the lent GPU with the Llama-3-8B shape (random bf16 weights) and the trained predictor:
#   bash bench/device/sweep.sh NAME DATASET_NAME DATASET_PATH NUM_PROMPTS "POLICIES" "RATES" [more sweep flags]
# e.g. bash bench/device/sweep.sh sg2000 sharegpt .bench-data/sharegpt_sample_1000.json 2000 "fcfs alise" "55 70"
# PREDICTOR names the trained predictor under .bench-data (default `predictor`; `predictor_880` for the 3,000-request
# held-out split of make_bundle.sh). With --ignore-eos no output stops by itself, so the predictor learns nothing
# online unless the scheduler is told to learn the forced lengths: add --scheduler-arg=--learn-forced-lengths.
# Runs are kept under out/NAME while the machine stays warm (--resume skips the ones done), so a sweep longer
# than one call goes on in the next call. Summaries, report and figures come back as $OUT/NAME.tar.xz.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/device/env.sh
name=$1 dataset=$2 path=$3 n=$4 policies=$5 rates=$6
shift 6
D=$PWD/.bench-data
predictor=${PREDICTOR:-predictor}
# the default predictor learnt from conversations 628-999, which the 880-conversation split measures
case "$path" in *_880*) [ "$predictor" = predictor_880 ] || { echo "$path needs PREDICTOR=predictor_880" >&2; exit 2; } ;; esac
[ -f "$D/$predictor/meta.json" ] || { echo "no trained predictor at $D/$predictor (was its bundle carried?)" >&2; exit 2; }
# shellcheck disable=SC2086  # the policy and rate lists are meant to split
timeout --signal=INT "${SWEEP_TIMEOUT:-540}" python3 -m client.cli bench sweep --dataset-name "$dataset" --dataset-path "$path" --tokenizer "$D/llama3-8b-shape" \
    --num-prompts "$n" --policies $policies --rates $rates --prime 20 --resume --out "out/$name" \
    --worker-arg=--device=cuda --worker-arg=--dtype=bfloat16 --worker-arg=--model-dir="$D/llama3-8b-shape" \
    --worker-arg=--random-weights --worker-arg=--max-model-len=4096 --worker-arg=--num-host-blocks=0 \
    --scheduler-arg=--model-dir="$D/llama3-8b-shape" --scheduler-arg=--max-tokens-cap=4096 \
    --predictor-arg=--model-dir="$D/$predictor" "$@" || status=$?
# whatever finished comes back, also when a run failed or the sweep ran past SWEEP_TIMEOUT (seconds; the device
# kills a whole call at 600 s, and this tar must run before that)
if [ -n "${OUT:-}" ] && [ -d "out/$name" ]; then
    tar cJf "$OUT/$name.tar.xz" -C out "$name"
fi
exit "${status:-0}"
