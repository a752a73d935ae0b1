#!/usr/bin/env bash
# Issue 21, side by side in one GPU call: the fixed cost of one find_or_insert (bench_table.py
# --only-call-sizes: 64K, 256K and 1M keys) with this checkout's hash index, then with an earlier
# commit's hash index swapped in (BASELINE: a copy of packages/dynamicemb/src/dynamicemb/hash_index from
# that commit, default .baseline-hash_index beside this checkout or in it), then this checkout's again;
# the editable install reads the package folder, so swapping the folder swaps the code; and this checkout's
# index with DYNAMICEMB_BOUND_LAUNCHES=0 (every launch through JITFunction.run). Also the GPU tests of the
# call-cost, warm-up, deterministic and differential files, then test_dynamicemb_gpu.py, with this checkout.
#   COMMIT=<sha> BASELINE_COMMIT=<sha> bash tools/gpu/dynamicemb_call_cost_ab.sh
# Under $OUT (or /tmp/dynamicemb-ab): tests.log, <label>/<device>.json and <label>.log for each run.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/dynamicemb-ab}
mkdir -p "$out"
for carried in .gpu-wheels .baseline-hash_index; do
  [ -e "$carried" ] || [ ! -e "../$carried" ] || ln -s "../$carried" "$carried"
done
baseline=${BASELINE:-.baseline-hash_index}
[ -d "$baseline" ] || { echo "error: no baseline hash index at $baseline" >&2; exit 1; }
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
grep -E "^device" "$out/setup.log"
index=packages/dynamicemb/src/dynamicemb/hash_index
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -o faulthandler_timeout=120 \
  packages/dynamicemb/tests/test_table_call_cost.py packages/dynamicemb/tests/test_table_warm_up.py \
  packages/dynamicemb/tests/test_deterministic.py packages/dynamicemb/tests/test_table_differential.py 2>&1 \
  | tail -15 > "$out/tests.log"
cat "$out/tests.log"
# the training-path GPU tests (row kernels and the fused optimizer launch through BoundKernel too)
timeout "${MODULE_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE \
  packages/dynamicemb/tests/test_dynamicemb_gpu.py 2>&1 | tail -8 > "$out/module-tests.log"
cat "$out/module-tests.log"
bench() {  # label commit
  timeout 120 python3 packages/dynamicemb/benchmarks/bench_table.py --only-call-sizes --commit "$2" \
    --out "$out/$1" 2>&1 | grep -E "find_or_insert_call|wrote" > "$out/$1.log"
  echo "== $1 ($2)"; cat "$out/$1.log"
}
bench current "${COMMIT:-unknown}"
DYNAMICEMB_BOUND_LAUNCHES=0 bench current-jit-launches "${COMMIT:-unknown}"
mv "$index" "$out/current-index" && cp -r "$baseline" "$index"
bench baseline "${BASELINE_COMMIT:-unknown}"
rm -rf "$index" && mv "$out/current-index" "$index"
bench current-again "${COMMIT:-unknown}"
