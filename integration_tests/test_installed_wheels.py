"""The packages under test are the built wheels, complete: every source file and entry point is installed.

`nox -s integration` builds each package's sdist and wheel (as `nox -s build` does), installs the wheels (not
editable) and sets INTEGRATION_FROM_WHEELS=1; every other integration test then runs against them. Here: each
distribution is installed from a wheel, not from the workspace, holds every file of its package's source tree
(modules, py.typed, any data file), and its console scripts start.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))

pytestmark = pytest.mark.skipif(
    os.environ.get("INTEGRATION_FROM_WHEELS") != "1",
    reason="checks installed wheels: nox -s integration installs them and sets INTEGRATION_FROM_WHEELS=1",
)


def _project(package_dir: Path) -> dict:
    return tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("package_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_distribution_is_an_installed_wheel_with_every_source_file(package_dir: Path) -> None:
    dist = metadata.distribution(_project(package_dir)["name"])
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), f"{dist.name} is installed editable"
    assert "archive_info" in direct_url and direct_url["url"].endswith(".whl"), f"{dist.name}: {direct_url}"

    source = package_dir / "src"
    expected = {
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    installed = {f.as_posix() for f in dist.files or []}
    missing = sorted(expected - installed)
    assert not missing, f"the {dist.name} wheel lacks {missing}"

    module_name = next(iter({Path(f).parts[0] for f in expected}))
    module = importlib.import_module(module_name)
    assert not Path(module.__file__).resolve().is_relative_to(ROOT / "packages"), module.__file__


@pytest.mark.parametrize(
    "script",
    [(name, p) for p in PACKAGE_DIRS for name in _project(p).get("scripts", {})],
    ids=lambda s: s[0],
)
def test_console_script_is_installed_and_starts(script: tuple[str, Path]) -> None:
    name, package_dir = script
    declared = _project(package_dir)["scripts"][name]
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert installed.get(name) == declared, f"{name}: installed {installed.get(name)!r}, declared {declared!r}"
    executable = Path(sys.executable).parent / name
    assert executable.is_file(), f"{executable} is missing"
    run = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stdout[-2000:] + run.stderr[-2000:]
