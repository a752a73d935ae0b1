#!/usr/bin/env bash
# Time several builds of libhstu_attn_cutlass.so side by side in one GPU call, with the Triton kernels and cuDNN as
# the baseline of the same call: each library runs bench_attention.py (backends cutlass and cutlass_sm90) in its own
# process (HSTU_ATTN_CUTLASS_LIB), then the baseline runs once. Build the libraries on the CPU machine (see
# gpu_tests_prebuilt.sh), put them in the carried folder under names that say what they are, e.g. lib-4ed7af0.so:
#   run(command="cd .snapshot && bash tools/gpu/cutlass_variants.sh libs/*.so", carry=[".snapshot"])
# Options (environment): BENCH_SHAPES (comma-separated --shapes substrings), BASELINE=0 skips the Triton/cuDNN run,
# DEADLINE_S (default 500). Writes $OUT/<library name>/<device>.json and $OUT/baseline/<device>.json.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/cutlass-variants}
mkdir -p "$out"
started=$(date +%s)
deadline=${DEADLINE_S:-500}
[ -e .gpu-wheels ] || [ ! -e ../.gpu-wheels ] || ln -s ../.gpu-wheels .gpu-wheels
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
commit=$(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
IFS=',' read -r -a shapes <<< "${BENCH_SHAPES:-full B32 N1024,jagged B32 N1024,full B8 N4096 H4 D128,jagged B16 N4096}"
bench() {  # bench <name> <seconds> <extra bench_attention.py flag, or -> <backends...>
  local name=$1 limit=$2 flag=$3
  shift 3
  [ "$flag" != - ] || flag=""  # "-": no extra flag
  local left=$(( deadline - ($(date +%s) - started) - 3 ))
  [ "$left" -gt 20 ] || { echo "$name skipped (no time left)"; return; }
  [ "$limit" -le "$left" ] || limit=$left
  mkdir -p "$out/$name"
  timeout -s INT -k 10 "$limit" python3 packages/hstu-attn/benchmarks/bench_attention.py $flag \
    --out "$out/$name" --backends "$@" --shapes "${shapes[@]}" --memory-shape none --commit "$commit" \
    > "$out/$name/bench.log" 2>&1
  echo "== $name (exit $?)"
  grep -E "ours_|sdpa_" "$out/$name/bench.log"
}
for library in "$@"; do
  case "$library" in /*) ;; *) library=$PWD/$library ;; esac
  HSTU_ATTN_CUTLASS_LIB=$library bench "$(basename "$library" .so)" 90 --no-precompile cutlass cutlass_sm90
done
[ "${BASELINE:-1}" = 0 ] || HSTU_ATTN_TRITON_AUTOTUNE=1 bench baseline 200 - ours sdpa_cudnn
