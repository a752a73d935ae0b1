#!/usr/bin/env bash
# Short GPU call: install, then pytest selections one after another, each with its own time limit, using a
# libhstu_attn_cutlass.so built on the CPU machine (no CUDA build on the device), within DEADLINE_S seconds.
# Build the library here first (nvcc 13, CUTLASS headers from the carried nvidia_cutlass wheel):
#   python3 -m zipfile -e .gpu-wheels/nvidia_cutlass-*.whl /tmp/cutl
#   cmake -S packages/hstu-attn -B /tmp/hab -G Ninja -DCMAKE_BUILD_TYPE=Release -DHSTU_ATTN_BUILD_CUDA=1 \
#     -DHSTU_ATTN_CUDA_ARCHS=90a -DCUTLASS_INCLUDE_DIR=/tmp/cutl/cutlass_library/source/include
#   cmake --build /tmp/hab && cp /tmp/hab/csrc/libhstu_attn_cutlass.so .snapshot/
#   run(command="cd .snapshot && bash tools/gpu/gpu_tests_prebuilt.sh 'SECONDS|PYTEST ARGS' ...", carry=[".snapshot"])
# Each argument is "limit in seconds|pytest arguments" (shell words: quote a -k expression inside); a part starts only while DEADLINE_S (default 180) allows.
# Logs under $OUT (or /tmp/gpu-tests): part-N.log (pytest -rfE: the failures' one-line reasons), steps.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-tests}
mkdir -p "$out"
started=$(date +%s)
deadline=${DEADLINE_S:-180}
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$out/steps.txt"; }
for carried in .gpu-wheels; do
  [ -e "$carried" ] || [ ! -e "../$carried" ] || ln -s "../$carried" "$carried"
done
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
stamp "installed"; grep -E "^device" "$out/setup.log"
library=${CUTLASS_LIB:-libhstu_attn_cutlass.so}
if [ -f "$library" ]; then
  export HSTU_ATTN_CUTLASS_LIB=$PWD/$library
  python3 -c "from hstu_attn.cutlass import _library; print('CUTLASS library:', _library.load())"
fi
part=0
for spec in "$@"; do
  part=$((part + 1))
  limit=${spec%%|*}
  args=${spec#*|}
  left=$(( deadline - ($(date +%s) - started) - 3 ))
  [ "$left" -gt 10 ] || { stamp "part $part skipped (no time left): $args"; continue; }
  [ "$limit" -le "$left" ] || limit=$left
  stamp "part $part (${limit}s): pytest $args"
  # the arguments are shell words (quote a -k expression inside them)
  eval "timeout -s INT -k 10 $limit python3 -m pytest -q -p no:cacheprovider -rfE --tb=line $args" > "$out/part-$part.log" 2>&1
  stamp "part $part exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed|skipped|no tests ran" "$out/part-$part.log" | cut -c1-300 | tail -25
done
stamp done
