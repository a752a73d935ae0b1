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
# "limit*N|pytest arguments" splits the collected tests round-robin over N pytest processes run side by side (Triton
# compiles on the CPU, so shards cut the wall time); "limit|!command" runs a shell command (e.g. a benchmark) instead.
# Logs under $OUT (or /tmp/gpu-tests): part-N.log (pytest -rfE: the failures' one-line reasons), steps.txt.
# Triton autotuning is off unless HSTU_ATTN_TRITON_AUTOTUNE is set (timing every candidate at every new shape made the
# Triton tests take minutes each); test_hstu_triton.py's test_gpu_every_launch_config_matches_reference checks each
# candidate config instead.
set -uo pipefail
export PYTHONUNBUFFERED=1
export HSTU_ATTN_TRITON_AUTOTUNE=${HSTU_ATTN_TRITON_AUTOTUNE:-0}
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
  shards=1
  case "$limit" in *\**) shards=${limit#*\*}; limit=${limit%%\**} ;; esac
  [ "$limit" -le "$left" ] || limit=$left
  log="$out/part-$part.log"
  if [ "${args:0:1}" = "!" ]; then
    stamp "part $part (${limit}s): ${args:1}"
    eval "timeout -s INT -k 10 $limit ${args:1}" > "$log" 2>&1
    stamp "part $part exit $?"
    tail -25 "$log" | cut -c1-300
    continue
  fi
  stamp "part $part (${limit}s, $shards shard(s)): pytest $args"
  if [ "$shards" -gt 1 ]; then
    eval "python3 -m pytest -q -p no:cacheprovider --collect-only $args" 2>/dev/null | grep "::" > "$out/part-$part.ids"
    options=()  # the arguments without their paths: each shard names its own tests
    eval "set -- $args"
    for word in "$@"; do case "$word" in packages/*|integration_tests/*) ;; *) options+=("$word") ;; esac; done
    for shard in $(seq 0 $((shards - 1))); do
      awk -v n="$shards" -v i="$shard" 'NR % n == i' "$out/part-$part.ids" > "$out/part-$part.shard-$shard.ids"
      [ -s "$out/part-$part.shard-$shard.ids" ] || continue
      mapfile -t ids < "$out/part-$part.shard-$shard.ids"
      (timeout -s INT -k 10 "$limit" python3 -m pytest -q -p no:cacheprovider -rfE --tb=line "${options[@]}" "${ids[@]}" \
        > "$out/part-$part.shard-$shard.log" 2>&1
       echo "shard $shard exit $? ($(wc -l < "$out/part-$part.shard-$shard.ids") tests)" >> "$out/part-$part.shard-$shard.log") &
    done
    wait
    for shard_log in "$out"/part-$part.shard-*.log; do  # each shard's ids, then its log (a killed shard's ids tell
      echo "== $shard_log"                                # which tests never finished)
      sed 's/^/id /' "${shard_log%.log}.ids"
      cat "$shard_log"
    done > "$log"
    rm -f "$out"/part-$part.shard-*  # one log per part comes back (the device tool returns a bounded number of files)
    stamp "part $part done ($(wc -l < "$out/part-$part.ids") tests in $shards shards)"
  else
    # the arguments are shell words (quote a -k expression inside them)
    eval "timeout -s INT -k 10 $limit python3 -m pytest -q -p no:cacheprovider -rfE --tb=line $args" > "$log" 2>&1
    stamp "part $part exit $?"
  fi
  grep -E "^(FAILED|ERROR)|passed|failed|skipped|no tests ran|^shard [0-9]+ exit" "$log" | cut -c1-300 | tail -25
done
stamp done
