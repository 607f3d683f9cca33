#!/usr/bin/env bash
# Unpacks whichever bundles of bench/device/make_bundle.sh a device call carried into .bench-data (once per machine).
# env.sh runs it at the start of every sweep. Run it alone in a first call that carries only the bundle when the
# tracked tree, a bundle and the wheels together pass the 64 MiB a call carries (they have since session 37: the
# tree is ~34 MB): later calls on the same warm machine then carry [".whl", "alise/v1"] and find .bench-data there.
#   device call 1: carry ["bench-data.tar.xz"], command: bash bench/device/unpack.sh
# By session 42 the tracked tree alone was ~42 MB (docs/results ~38 MB), so even call 1 passed 64 MiB: move
# docs/results out of the tree for that call (`mv docs/results /tmp/hold/`, back after it); it needs none of it.
# Session 43 unpacked and ran in one call: docs/results moved out but for the one file run_summary.py reads
# (h100_chat_2026-12-06_s30/sim/cost_h100_s30.json, copied back in), carry ["bench-data-880.tar.xz", ".whl",
# "alise/v1"] (~40 MB), `bash bench/device/unpack.sh && ... diagnose_s33.sh`: one machine start fewer.
cd "$(dirname "$0")/../.." || exit 1
for bundle in bench-data*.tar.xz; do
    [ -e "$bundle" ] || continue
    done_mark=".bench-data/.unpacked-${bundle%.tar.xz}"
    [ -e "$done_mark" ] || { tar xJf "$bundle" && touch "$done_mark"; } || exit 1
done
[ -x .bench-data/bin/redis-server ] \
    || { echo "no bench-data*.tar.xz was carried (bench/device/make_bundle.sh)" >&2; exit 1; }
