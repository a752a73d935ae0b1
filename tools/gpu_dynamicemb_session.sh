#!/usr/bin/env bash
# One call on the lent GPU machine for dynamicemb (from the repository root, carry .gpu-wheels):
# the insert_and_evict profile, the table and module GPU tests, then bench_table.py (with the
# training-step rows); on request also bench_value_store.py (part "tiers") and bench_sharded.py with
# value rows in device and in host memory on 1 and 2 GPUs (part "sharded", kind nvidia-h200-x2). Logs, the profile and the results JSON go to $OUT. Each part has its own time
# limit (PART_TIMEOUT seconds, default 240), so a hung kernel costs one part, not the whole call; pytest
# dumps the stacks of a test that runs past 120 s.
# Part "gaps" (issue 21's training gaps, about 150 s): the GPU tests of the kernels compiled at table
# creation, the deterministic mode and the synchronization-free find_or_insert (JUnit XML and log), then
# bench_table.py's fixed-cost rows only (one find_or_insert at 64K, 256K and 1M keys) as
# $OUT/<device>.json.
#   COMMIT=<sha> bash tools/gpu_dynamicemb_session.sh [profile|tests|bench|tiers|sharded|gaps ...]
set -o pipefail
export PYTHONUNBUFFERED=1
GR_SKIP_TESTS=1 source tools/gpu/setup.sh
set +e
out=${OUT:-/tmp/dynamicemb-gpu}
mkdir -p "$out"
parts=${*:-profile tests bench}
rc=0
limit=${PART_TIMEOUT:-240}
for part in $parts; do
  case "$part" in
    profile)
      timeout "$limit" python3 packages/dynamicemb/benchmarks/profile_evict.py --out "$out" 2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" \
        | tee "$out/profile.log" || rc=1 ;;
    tests)
      timeout "$limit" python3 -m pytest -q -p no:cacheprovider --maxfail=8 -o faulthandler_timeout=120 packages/dynamicemb/tests/test_table_behaviour.py packages/dynamicemb/tests/test_table_differential.py packages/dynamicemb/tests/test_table_row_moves.py packages/dynamicemb/tests/test_dynamicemb_storage.py packages/dynamicemb/tests/test_table_kernels_compile.py packages/dynamicemb/tests/test_dynamicemb_gpu.py 2>&1 \
        | tee "$out/tests-full.log" | tail -30 | tee "$out/tests.log" || rc=1 ;;
    bench)
      timeout "$limit" python3 packages/dynamicemb/benchmarks/bench_table.py --commit "${COMMIT:-unknown}" --out "$out" ${BENCH_ARGS:-} \
        2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" | tee "$out/bench.log" || rc=1 ;;
    gaps)
      timeout "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu -o faulthandler_timeout=120 \
        --junitxml "$out/gaps-tests.xml" packages/dynamicemb/tests/test_table_warm_up.py \
        packages/dynamicemb/tests/test_deterministic.py packages/dynamicemb/tests/test_table_call_cost.py 2>&1 \
        | tee "$out/gaps-tests-full.log" | tail -30 | tee "$out/gaps-tests.log" || rc=1
      timeout "$limit" python3 packages/dynamicemb/benchmarks/bench_table.py --only-call-sizes --commit "${COMMIT:-unknown}" \
        --out "$out" 2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" | tee "$out/gaps-bench.log" || rc=1 ;;
    tiers)
      timeout "$limit" python3 packages/dynamicemb/benchmarks/bench_value_store.py --commit "${COMMIT:-unknown}" --out "$out/value_store.json" \
        2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" | tee "$out/value_store.log" || rc=1 ;;
    sharded)
      for memory in device host; do
        timeout "$limit" python3 packages/dynamicemb/benchmarks/bench_sharded.py --world-sizes 1 2 --value-memory "$memory" \
          --commit "${COMMIT:-unknown}" --profile "$out/prof" --out "$out/sharded-$memory.json" 2>&1 | tee "$out/sharded-$memory-full.log" \
          | grep -E "GPUs|^ +[0-9]+ |wrote|Error|error" || rc=1
      done ;;
  esac
done
exit "$rc"
