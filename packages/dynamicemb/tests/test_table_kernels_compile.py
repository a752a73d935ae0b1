"""The table's Triton kernels compile for a Hopper GPU (sm_90) on any machine.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts code the compiler rejects
(e.g. a loop variable whose type changes between loops). This compiles each kernel ahead of time
for ``cuda:90``, in a child process without the interpreter, so such errors fail in CI instead of
on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# "module:kernel[#variant]" -> its constexprs; modules are under dynamicemb.
CASES = {
    "hash_index.triton_kernels:lookup_kernel": {"SCORE_MODE": 1, "BUCKET": 128, "GROUP": 16, "NUM_GROUPS": 8,
                                                "BLOCK": 128},
    "hash_index.triton_kernels:find_or_insert_kernel": {"SCORE_MODE": 1, "DEFER_FULL": True, "LIST_DEFERRED": False,
                                                        "BUCKET": 128, "GROUP": 16, "NUM_GROUPS": 8, "BLOCK": 128},
    "hash_index.triton_kernels:find_or_insert_kernel#listing": {"SCORE_MODE": 1, "DEFER_FULL": True,
                                                                "LIST_DEFERRED": True, "BUCKET": 128, "GROUP": 16,
                                                                "NUM_GROUPS": 8, "BLOCK": 128},
    "hash_index.triton_kernels:find_or_insert_kernel#lfu": {"SCORE_MODE": 2, "DEFER_FULL": True,
                                                            "LIST_DEFERRED": True, "BUCKET": 128, "GROUP": 16,
                                                            "NUM_GROUPS": 8, "BLOCK": 128},
    "storage.row_kernels:gather_rows_kernel": {"ROWS": 16, "BLOCK_D": 128},
    "storage.row_kernels:scatter_rows_kernel": {"ROWS": 16, "BLOCK_D": 128},
    "storage.row_kernels:gather_split_rows_kernel": {"ROWS": 16, "BLOCK_D": 128},
    "storage.row_kernels:gather_split_rows_kernel#dim384": {"ROWS": 32, "BLOCK_D": 128},
    "storage.row_kernels:gather_split_rows_kernel#dim64": {"ROWS": 64, "BLOCK_D": 64},
    "storage.row_kernels:scatter_split_rows_kernel": {"ROWS": 16, "BLOCK_D": 128},
    "storage.row_kernels:scatter_split_rows_kernel#dim384": {"ROWS": 32, "BLOCK_D": 128},
    "hash_index.triton_grouped_eviction:place_deferred_kernel": {"NUM_GROUPS": 8, "BLOCK": 1024},
    "hash_index.triton_grouped_eviction:evict_grouped_kernel": {"BUCKET": 128, "NUM_GROUPS": 8, "CHUNK": 16},
    "hash_index.triton_grouped_eviction:evict_ranked_kernel": {"BUCKET": 128, "NUM_GROUPS": 8, "CHUNK": 16},
}  # fmt: skip

_CHILD = r"""
import json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

types = {"digests_ptr": "*u8", "evicted_ptr": "*i8", "out_found_ptr": "*i8", "existed_ptr": "*i8",
         "epochs_ptr": "*i32", "words_ptr": "*i32", "values_ptr": "*fp32", "out_ptr": "*fp32", "rows_ptr": "*fp32",
         "device_ptr": "*fp32", "host_ptr": "*fp32",
         # row-kernel sizes and strides: Python ints below 2**31, which the launcher passes as i32
         "dim": "i32", "device_rows": "i32", "device_stride": "i32", "host_stride": "i32",
         "out_stride": "i32", "rows_stride": "i32", "values_stride": "i32",
         "epoch": "i32", "counts_ptr": "*i32", "ends_ptr": "*i32", "starts_ptr": "*i32",
         "grouped_lanes_ptr": "*i32",
         "segment_buckets_ptr": "*i32"}
results = {}
for name, constexprs in json.loads(sys.argv[1]).items():
    module, kernel_name = name.split("#")[0].split(":")
    kernel = getattr(importlib.import_module("dynamicemb." + module), kernel_name)
    signature = {a: types.get(a, "*i64" if a.endswith("_ptr") else "i64") for a in kernel.arg_names}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    # Pointers 16-byte aligned and row sizes multiples of 16 (dims 128, 384), as the launcher
    # specializes them on a GPU.
    aligned = {"dim", "device_rows", "device_stride", "host_stride", "out_stride", "rows_stride", "values_stride", "n"}
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, a in enumerate(kernel.arg_names) if a.endswith("_ptr") or a in aligned}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32))
        results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
    except Exception:
        results[name] = traceback.format_exc()[-1500:]
print("RESULTS " + json.dumps(results))
"""


pytestmark = pytest.mark.slow  # compiles the Triton kernels for sm_90 in a child process


@pytest.fixture(scope="module")
def compile_results() -> dict[str, str]:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"the compile process failed:\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name: str, compile_results: dict[str, str]) -> None:
    assert compile_results[name] == "ok", f"{name} does not compile for sm_90:\n{compile_results[name]}"
