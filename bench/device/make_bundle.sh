#!/usr/bin/env bash
# Builds, on the dev machine, what a device call needs and the device image lacks (the device has no network):
#   .bench-data/   Llama-3-8B shape (config + SmolLM2 tokenizer), redis-server unpacked with a wrapper,
#                  the ShareGPT / Alpaca workloads and a static predictor trained on the rest of each file
#   .whl/          wheels for the packages the image lacks or has in other versions
# and packs .bench-data into bench-data.tar.xz (and what 3,000-request runs need into bench-data-880.tar.xz). All are
# git-ignored; a device call carries ["bench-data.tar.xz", ".whl", "alise/v1"] (or bench-data-880.tar.xz instead of
# bench-data.tar.xz) and runs bench/device/sweep.sh (or bench/device/env.sh first).
# Steps already done are skipped, so a rerun only redoes what is missing. Needs the venv (`make venv`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
D=.bench-data
SMOL=$($PY -c 'from services.common.model_paths import default_model_dir; print(default_model_dir())')
DATA=${ALISE_DATA:-../shared/data}
mkdir -p "$D"

# 1. The served model's shape: Llama-3-8B's config with SmolLM2's tokenizer (workers build random weights).
if [ ! -f "$D/llama3-8b-shape/config.json" ]; then
    mkdir -p "$D/llama3-8b-shape"
    cp "$SMOL"/tokenizer* "$SMOL"/chat_template.jinja "$SMOL"/generation_config.json "$D/llama3-8b-shape/"
    $PY - "$D/llama3-8b-shape/config.json" <<'PY'
import json, sys
from bench.engine_bench import LLAMA3_8B
cfg = dict(LLAMA3_8B, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
           hidden_act="silu", bos_token_id=1, eos_token_id=2)
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
fi

# 2. redis-server from this machine's Debian archive, unpacked, run through a wrapper that finds its libraries.
if [ ! -x "$D/bin/redis-server" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download redis-server redis-tools libjemalloc2 liblzf1 >/dev/null)
    for f in "$tmp"/*.deb; do dpkg -x "$f" "$D/redis"; done
    mkdir -p "$D/bin"
    cat > "$D/bin/redis-server" <<'SH'
#!/bin/sh
here=$(cd "$(dirname "$0")/../redis" && pwd)
LD_LIBRARY_PATH="$here/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/usr/bin/redis-server" "$@"   # redis picks its mode from argv[0]
SH
    chmod +x "$D/bin/redis-server"
    rm -rf "$tmp"
fi

# 3. Workloads, and the rest of each file for training the predictor (never the measured prompts):
#    ShareGPT: the first 628 conversations hold the 2,000 turns a sweep sends; Alpaca: the first 1,200 items.
if [ ! -f "$D/alpaca_heldout_1200.json" ]; then
    $PY - "$DATA" "$D" <<'PY'
import json, sys
data, out = sys.argv[1:]
sg = json.load(open(f"{data}/sharegpt_sample_1000.json"))
al = json.load(open(f"{data}/alpaca_5000.json"))
json.dump(sg[:628], open(f"{out}/sharegpt_sample_1000.json", "w"))
json.dump(sg[628:], open(f"{out}/sharegpt_rest.json", "w"))
json.dump(al[:1200], open(f"{out}/alpaca_heldout_1200.json", "w"))
json.dump(al[1200:], open(f"{out}/alpaca_rest.json", "w"))
PY
fi
# a predictor trained before the conversation line (session 34), its newest-message term (session 36) or the short
# messages' index (session 37) is trained again: it would rank chats worse
fresh_predictor() { [ -f "$1/meta.json" ] && [ -f "$1/messages.npz" ] && grep -qs '"reply_c"' "$1/params.json"; }
if ! fresh_predictor "$D/predictor"; then
    rm -rf "$D/predictor"           # no file of the old one (its fine-tuned encoder) may outlive it
    $PY -m services.predictor.train "$D/sharegpt_rest.json" "$D/alpaca_rest.json" --encoder static --out "$D/predictor"
fi
# 3b. For 3,000-request runs (`sharegpt-chat`: 3,020 turns with the priming ones): the first 880 conversations
#     (3,045 turns) are measured and the predictor learns from the other 120 and the Alpaca rest; a sweep picks it
#     with PREDICTOR=predictor_880 (bench/device/sweep.sh), carrying bench-data-880.tar.xz.
if [ ! -f "$D/sharegpt_heldout_880.json" ] || [ ! -f "$D/sharegpt_rest_120.json" ]; then
    $PY - "$DATA" "$D" <<'PY'
import json, sys
data, out = sys.argv[1:]
sg = json.load(open(f"{data}/sharegpt_sample_1000.json"))
json.dump(sg[:880], open(f"{out}/sharegpt_heldout_880.json", "w"))
json.dump(sg[880:], open(f"{out}/sharegpt_rest_120.json", "w"))
PY
fi
if ! fresh_predictor "$D/predictor_880"; then
    rm -rf "$D/predictor_880"
    $PY -m services.predictor.train "$D/sharegpt_rest_120.json" "$D/alpaca_rest.json" --encoder static --out "$D/predictor_880"
fi

# 3c. The Azure LLM trace, for arrivals with its gaps (`--arrival-trace .bench-data/azure/AzureLLMInferenceTrace_code.csv`):
#     ../shared is not on the device.
if [ ! -f "$D/azure/AzureLLMInferenceTrace_code.csv" ]; then
    mkdir -p "$D/azure"
    cp "$DATA"/azure_llm_trace_2023/AzureLLMInferenceTrace_{conv,code}.csv "$D/azure/"
fi

# 4. Wheels for Python 3.12 on x86-64 (the image's grpcio and protobuf are older than the generated modules need).
#    No faiss (19 MB): the predictor's index searches exactly in numpy without it (services/predictor/knn_index.py).
mkdir -p .whl
rm -f .whl/faiss_cpu-*.whl                 # carried by bundles made before session 29
for spec in grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
            redis==8.1.0 hiredis==3.5.0 starlette==1.10.0 uvicorn==0.54.0; do
    name=${spec%%==*}
    ls .whl/ | grep -qi "^${name//-/_}-" && continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$spec"
done

# Two bundles, so that each call carries what it needs within the 64 MiB a call may carry (each trained
# predictor is ~28 MB): the usual one, and the one for 3,000-request runs. The training files stay here.
# Redis's tools and docs stay out (only redis-server, a link to redis-check-rdb, runs there). The tracked tree
# travels too (~15 MB by session 29, ~34 MB by session 37): past 64 MiB with a bundle and the wheels (~8.5 MB
# without faiss), so the bundle goes alone in a first call (bench/device/unpack.sh says how).
lean=(--exclude="*/share/doc" --exclude="redis-benchmark" --exclude="redis-check-aof" --exclude="redis-cli")
tar cJf bench-data.tar.xz "${lean[@]}" --exclude="*_rest*.json" --exclude="*_880*" --exclude=".unpacked-*" "$D"
tar cJf bench-data-880.tar.xz "${lean[@]}" "$D/llama3-8b-shape" "$D/bin" "$D/redis" "$D/predictor_880" \
    "$D/sharegpt_heldout_880.json"
du -sh bench-data.tar.xz bench-data-880.tar.xz .whl
