# Sourced at the start of a device call (bash): unpacks the bundle that bench/device/make_bundle.sh made,
# installs the carried wheels where the image's packages do not shadow them, and puts redis-server on PATH.
for bundle in bench-data*.tar.xz; do     # whichever bundles of bench/device/make_bundle.sh the call carried
    [ -e "$bundle" ] || continue
    [ -e ".bench-data/.unpacked-${bundle%.tar.xz}" ] || { tar xJf "$bundle" && touch ".bench-data/.unpacked-${bundle%.tar.xz}"; } || return 1
done
[ -x .bench-data/bin/redis-server ] || { echo "no bench-data*.tar.xz was carried (bench/device/make_bundle.sh)" >&2; return 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.bench-data/bin:$PATH PYTHONUNBUFFERED=1
