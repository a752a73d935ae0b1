#!/usr/bin/env bash
# GPU run for the dynamicemb hash-table index: the test_table_* suites on CUDA (behavioural suite on
# both backends, differential and large tests), then benchmarks/bench_table.py. Logs and the results
# JSON go to $OUT. Usage on the device machine, from the repository root:
#   COMMIT=<sha> bash tools/gpu_dynamicemb_table.sh
# Carry .gpu-wheels to get torchrec (tools/gpu/setup.sh) for the training-step rows. The table
# needs only torch + triton: when the full package does not import, the table modules are put on
# the path under a bare `dynamicemb` package and the training-step rows are skipped.
set -o pipefail
export PYTHONUNBUFFERED=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out=${OUT:-/tmp/dynamicemb-table-out}
mkdir -p "$out"
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  GR_SKIP_TESTS=1 source tools/gpu/setup.sh || echo "note: tools/gpu/setup.sh failed"
  set +e
fi
export PYTHONPATH="$root/packages/dynamicemb/src${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import dynamicemb" >/dev/null 2>&1; then
  shim=/tmp/dynamicemb-table-shim
  rm -rf "$shim" && mkdir -p "$shim/dynamicemb"
  cp -r packages/dynamicemb/src/dynamicemb/table "$shim/dynamicemb/"
  : >"$shim/dynamicemb/__init__.py"
  export PYTHONPATH="$shim"
  echo "note: the full dynamicemb package does not import here; using the table modules alone"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
python3 -m pytest -q -p no:cacheprovider --maxfail=8 packages/dynamicemb/tests/test_table_behaviour.py \
  packages/dynamicemb/tests/test_table_differential.py packages/dynamicemb/tests/test_table_row_moves.py \
  2>&1 | tee "$out/tests.log" || rc=$?
python3 packages/dynamicemb/benchmarks/bench_table.py --commit "${COMMIT:-unknown}" --out "$out" ${BENCH_ARGS:-} \
  2>&1 | tee "$out/bench.log" || rc=$?
exit "$rc"
