#!/usr/bin/env bash
# Issue 16: check on the GPU that the Triton HSTU kernels read the u/v/q/k split views in place (no q/k/v copies
# in forward or backward) and what that saves per training step. Written on a CPU machine; NOT yet run on a GPU.
# Two calls (each under the 10-minute limit), from the repository root:
#
#   run(command="PART=tests bash tools/gpu/hstu_strided_qkv.sh", carry=[".gpu-wheels"])
#   run(command="PART=bench bash tools/gpu/hstu_strided_qkv.sh", carry=[".gpu-wheels"])
#
# tests: the hstu-attn test directory on CUDA but the sm_90 AOT compile test (GPU-marked tests included; the new strided-view tests in
#   test_hstu_triton_strided.py run at their sizes on the GPU; CUTLASS tests skip unless the library is built),
#   then the gr-models HSTU layer tests. Logs and JUnit XML under $OUT.
# bench: tools/bench_e2e.py --configs nvidia twice on the same machine: "copies" restores the old behaviour by
#   monkeypatching (the Triton API copies q, k, v, grad_out to contiguous; the layer casts its output before the
#   residual add), "strided" is this commit; bench_e2e's variant 4 only (all step options on; 3 profiled steps).
#   VARIANTS="copies" (or "strided") runs one of them, should one call not fit both. Compare step times in
#   e2e-*.json and, in the profiler tables e2e-*.profile.txt, the aten::copy_ calls (expected 7 fewer per layer
#   forward+backward: q, k, v in forward and backward, the residual cast; 576 -> ~408 over 3 steps x 8 layers)
#   and the CUDA time of the unrolled direct_copy kernels (benchmarks/results/e2e-nvidia-h100-80gb-hbm3-profile-
#   nvidia.txt: 21.4 ms over 192 calls before).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/hstu-strided-qkv}
mkdir -p "$out"
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
grep -E "^device|^torch|^triton" "$out/setup.log"

case "${PART:-tests}" in
  tests)
    # -m "not slow": test_triton_sm90_compile only compiles ahead of time (passes on CPU; minutes here)
    HSTU_ATTN_TRITON_AUTOTUNE=0 timeout 480 python3 -m pytest packages/hstu-attn/tests -m "not slow" -q \
      -p no:cacheprovider --junitxml="$out/hstu-attn-tests.xml" 2>&1 | tee "$out/hstu-attn-tests.log" | tail -15
    timeout 120 python3 -m pytest packages/gr-models/tests/test_modules_hstu_layer.py -q -p no:cacheprovider \
      2>&1 | tee "$out/gr-models-layer-tests.log" | tail -3
    ;;
  bench)
    for variant in ${VARIANTS:-strided copies}; do
      echo "== bench_e2e nvidia: $variant"
      VARIANT=$variant timeout 270 python3 - --configs nvidia --variants 4 --steps 10 --out "$out/e2e-$variant.json" <<'PY' \
        2>&1 | grep -v fx_tracing | tee "$out/e2e-$variant.log" | grep -E "step|tokens/s"
import os, runpy, sys
if os.environ["VARIANT"] == "copies":  # the behaviour before this change, for a same-machine comparison
    import gr_models.modules.hstu_layer as layer
    import hstu_attn.triton.api as api
    api._unit_last = lambda t: t if t.is_contiguous() else t.contiguous()
    layer._residual_add = lambda x, y: x + y.to(x.dtype)
sys.argv = ["tools/bench_e2e.py", *sys.argv[1:]]
runpy.run_path("tools/bench_e2e.py", run_name="__main__")
PY
    done
    ;;
  *)
    echo "PART must be tests or bench" >&2
    exit 2
    ;;
esac
