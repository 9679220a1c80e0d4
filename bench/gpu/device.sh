#!/usr/bin/env bash
# The device-side wrapper: bash bench/gpu/device.sh 1|2|3 [more run.py options]
# Installs the carried wheels (pydantic & co.) into /tmp/site, then runs bench/gpu/run.py with the
# repo from source on PYTHONPATH, logging to $OUT/log_cmd<N>.txt (what comes back with results.jsonl).
set -u
cmd="${1:?usage: bash bench/gpu/device.sh 1|2|3 [run.py options]}"
shift
out="${OUT:-/tmp/gpukit-out}"
mkdir -p "$out"
wheels=(.gpukit/common/wheels/*.whl)
if [ ! -e "${wheels[0]}" ]; then
  echo "device.sh: error: no wheels under .gpukit/common/wheels (carry .gpukit/common; run bench/gpu/prepare.py first)"
  exit 2
fi
if ! python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { echo "device.sh: error: installing the carried wheels failed"; exit 2; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>/dev/null | sed 's/^/device.sh: gpu: /'
python3 bench/gpu/run.py --command "$cmd" --out "$out" "$@" 2>&1 | tee "$out/log_cmd$cmd.txt"
exit "${PIPESTATUS[0]}"
