# Sourced at the start of a device call (bash): unpacks the bundle that bench/device/make_bundle.sh made,
# installs the carried wheels where the image's packages do not shadow them, and puts redis-server on PATH.
bash bench/device/unpack.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.bench-data/bin:$PATH PYTHONUNBUFFERED=1
