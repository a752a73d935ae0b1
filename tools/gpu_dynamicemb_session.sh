#!/usr/bin/env bash
# One call on the lent GPU machine for dynamicemb (from the repository root, carry .gpu-wheels):
# the insert_and_evict profile, the table and module GPU tests, then bench_table.py (with the
# training-step rows). Logs, the profile and the results JSON go to $OUT.
#   COMMIT=<sha> bash tools/gpu_dynamicemb_session.sh [profile|tests|bench ...]
set -o pipefail
export PYTHONUNBUFFERED=1
GR_SKIP_TESTS=1 source tools/gpu/setup.sh
set +e
out=${OUT:-/tmp/dynamicemb-gpu}
mkdir -p "$out"
parts=${*:-profile tests bench}
rc=0
for part in $parts; do
  case "$part" in
    profile)
      python3 packages/dynamicemb/benchmarks/profile_evict.py --out "$out" 2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" \
        | tee "$out/profile.log" || rc=1 ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider --maxfail=8 packages/dynamicemb/tests/test_table_behaviour.py packages/dynamicemb/tests/test_table_differential.py packages/dynamicemb/tests/test_table_row_moves.py packages/dynamicemb/tests/test_table_kernels_compile.py packages/dynamicemb/tests/test_dynamicemb_gpu.py 2>&1 \
        | tail -30 | tee "$out/tests.log" || rc=1 ;;
    bench)
      python3 packages/dynamicemb/benchmarks/bench_table.py --commit "${COMMIT:-unknown}" --out "$out" ${BENCH_ARGS:-} \
        2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|\x1b|^\s*$" | tee "$out/bench.log" || rc=1 ;;
  esac
done
exit "$rc"
