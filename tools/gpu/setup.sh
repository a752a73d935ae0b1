#!/usr/bin/env bash
# Run on the GPU machine (device tool), from the repository root, with .gpu-wheels carried:
#   source tools/gpu/setup.sh            # install + versions + pytest -m gpu
#   GR_SKIP_TESTS=1 source tools/gpu/setup.sh   # install + versions only (for benchmark calls)
# Installs the carried cp312 wheels into a target directory (no network there), puts it on
# PYTHONPATH, installs the workspace packages editable, prints versions and the device name, and
# runs the GPU-marked tests. Sourcing keeps PYTHONPATH for the commands that follow.
_gr_caller_opts=$(set +o)
set -eo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
site=${GR_GPU_SITE:-/tmp/gr-site}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  echo "error: .gpu-wheels/ is empty: run tools/gpu/fetch_wheels.sh on the CPU machine and carry .gpu-wheels" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu-wheels/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
for pkg in hstu-attn dynamicemb gr-parallel gr-checkpoint gr-models; do
  HSTU_ATTN_BUILD_CUDA=${HSTU_ATTN_BUILD_CUDA:-0} python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation -e "packages/$pkg"
done
python3 - <<'PY'
import importlib, torch
print(f"device: {torch.cuda.get_device_name()}  (capability {torch.cuda.get_device_capability()})")
for mod in ["torch", "triton", "torchrec", "fbgemm_gpu", "megatron.core", "cutlass_library",
            "hstu_attn", "dynamicemb", "gr_parallel", "gr_checkpoint", "gr_models"]:
    try:
        m = importlib.import_module(mod)
        print(f"{mod:16s} {getattr(m, '__version__', '?')}  {m.__file__}")
    except Exception as exc:  # report, do not hide: the caller reads this output
        print(f"{mod:16s} IMPORT FAILED: {type(exc).__name__}: {exc}")
PY
if [ -z "${GR_SKIP_TESTS:-}" ]; then
  rc=0
  python3 -m pytest -m gpu -q -p no:cacheprovider packages ${GR_GPU_TEST_ARGS:-} || rc=$?
  if [ "$rc" = 5 ]; then echo "pytest -m gpu: no GPU-marked tests were collected"; rc=0; fi
  [ "$rc" = 0 ] || { echo "pytest -m gpu failed (exit $rc)" >&2; return "$rc" 2>/dev/null || exit "$rc"; }
fi
# When sourced, give the caller its own shell options back.
eval "$_gr_caller_opts"
