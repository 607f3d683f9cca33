#!/usr/bin/env bash
# Session 33 on the lent GPU: alise, alise with 8 early rows (alise@er8) and fcfs at RATE on the same arrivals
# (POLICIES, NAME, N; alise@nt: decode graphs not timed by bucket, as before session 33; since session 34 8 early
# rows are the default: alise@er32 runs the old 32; alise@ag15 / alise@ag30 / alise@ag45: aging 15 s (until session
# 34), 30 s (until session 41, when 45 s, now the default, was measured better live with the pull); alise@nv: no
# short messages' votes, session 38; alise@np: predictions not pulled by their kind's reliability, session 39;
# alise@g0: a dispatch pass for every event, as before session 44; alise@su64: at most ~64 jobs' tokens to their
# clients a step, half the scheduler's stream writes at 128+ running),
# each run's decode steps' device time against session 30's fitted cost, its waits and event-loop lags, and the
# graph routes its worker logged. One policy at a time (a sweep's --resume keeps the runs done): a machine whose
# requests take longer than MAX_ADMIT_S to get in (its CPU side lags, session 33) stops the call after that run, its
# device time kept for a better machine. BUCKETS=1 first runs bench/decode_graph_buckets.py (each graph's time, the
# route, steps of real contexts on the routed graph against their own, logits checked; ~90 s).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
source bench/device/machine.sh
source bench/device/env.sh      # the bundle, the wheels, PYTHONPATH (run_summary imports bench)
OUT=${OUT:-out}
status=0
if [ -n "${BUCKETS:-}" ]; then
    timeout 200 python3 -m bench.decode_graph_buckets --out "$OUT/decode_graph_buckets.json" 2>&1 \
        | grep -v Warning
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "decode_graph_buckets failed"; status=1; }
fi
export PREDICTOR=predictor_880
name=${NAME:-F}
max_admit=${MAX_ADMIT_S:-0.3}
# a 3,000-request run at 44 req/s (start, prime, arrivals, drain) took 165-175 s on session 38's H100: 170 s cut
# one off and lost it; two policies a call fit in the 600 s a call may run
for policy in ${POLICIES:-fcfs alise alise@ag15}; do
    SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-210} bash bench/device/sweep.sh "$name" sharegpt-chat \
        .bench-data/sharegpt_heldout_880.json "${N:-3000}" "$policy" "${RATES:-$rate}" \
        --ignore-eos --scheduler-arg=--learn-forced-lengths --variant-worker-arg=er8=--early-rows=8 \
        --variant-worker-arg=er32=--early-rows=32 --variant-scheduler-arg=ag15=--aging-s=15 \
        --variant-scheduler-arg=ag45=--aging-s=45 --variant-scheduler-arg=ag30=--aging-s=30 \
        --variant-worker-arg=nt=--no-timed-graph-buckets --variant-predictor-arg=nv=--message-weight=0 \
        --variant-predictor-arg=np=--no-kind-pull --variant-scheduler-arg=g0=--dispatch-gap-s=0 \
        --variant-worker-arg=su64=--stream-updates-per-step=64 2>&1 | tail -2
    runs=(out/"$name/$policy"-r*.json)
    [ ${#runs[@]} -gt 0 ] || { echo "$policy: no run saved"; status=1; continue; }
    python3 bench/device/run_summary.py --max-admit-s "$max_admit" "${runs[@]}"
    case $? in
        0) ;;
        3) echo "this machine lags ($policy: admission past $max_admit s at the mean): stopping"; status=3; break ;;
        *) echo "$policy: its run could not be read"; status=1 ;;
    esac
done
python3 bench/device/run_summary.py out/"$name"/*-r*.json
grep -h "replay the" out/"$name"/stack-*/worker-0.log | sort | uniq -c || true
exit "$status"
