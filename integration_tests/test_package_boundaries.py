"""The dependency DAG of ARCHITECTURE.md holds: no package imports one above it.

Each leaf is imported in a fresh interpreter and the set of workspace modules it pulled in is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WORKSPACE = ["hstu_attn", "dynamicemb", "gr_parallel", "gr_checkpoint", "gr_models"]
# What each package may import from the workspace (itself included), per ARCHITECTURE.md.
ALLOWED = {
    "hstu_attn": {"hstu_attn"},
    "dynamicemb": {"dynamicemb"},
    "gr_parallel": {"gr_parallel", "dynamicemb"},
    "gr_checkpoint": {"gr_checkpoint", "dynamicemb"},
    "gr_models": {"gr_models", "hstu_attn", "gr_parallel", "gr_checkpoint", "dynamicemb"},
}


def _workspace_modules_after_import(package: str) -> set[str]:
    code = (
        f"import sys, json, {package}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({WORKSPACE!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", WORKSPACE)
def test_import_pulls_only_allowed_workspace_packages(package: str) -> None:
    pulled = _workspace_modules_after_import(package)
    assert package in pulled
    assert pulled <= ALLOWED[package], f"{package} imports {sorted(pulled - ALLOWED[package])}"


def test_hstu_attn_imports_without_triton_loaded() -> None:
    code = "import sys, hstu_attn; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "False", "import hstu_attn must not import triton eagerly"
