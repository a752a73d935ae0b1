"""Install workspace packages and their declared dependencies into a Python environment.

TorchRec's metadata requires the CUDA ``fbgemm-gpu`` wheel (about 500 MB). On CPU machines we want
``fbgemm-gpu-cpu`` instead, so this helper installs ``torchrec`` with ``--no-deps``, then its other
requirements, then ``fbgemm-gpu-cpu``. Every other external requirement is installed as declared,
pinned by a constraints file. Sibling workspace packages are installed from their local paths.

Usage (nox calls it with the session's interpreter)::

    python tools/install_stack.py --python .nox/test_env/bin/python \
        --constraints constraints/cpu.txt [--editable] [--extra redis] [--group test] [--with mypy ...] \
        packages/dynamicemb packages/gr-models

``--group NAME`` adds the named ``[dependency-groups]`` table (PEP 735) of each listed package, read here with
tomllib: the pip of Python 3.11's venvs (23.x) predates ``pip install --group`` (pip 25.1).
``--wheels DIR`` installs the workspace packages from the wheels in DIR (as ``nox -s build`` makes them)
instead of from their directories. Where pip finds wheels (a local folder holding the CPU torch wheel, an
extra index) is pip's own configuration: ``pip.conf``, ``PIP_FIND_LINKS``, ``PIP_EXTRA_INDEX_URL``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"
CUDA_FBGEMM = "fbgemm-gpu"
CPU_FBGEMM = "fbgemm-gpu-cpu"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def workspace_packages() -> dict[str, Path]:
    """Distribution name -> package directory, for every package under ``packages/``."""
    found = {}
    for pyproject in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        meta = tomllib.loads(pyproject.read_text())["project"]
        found[_normalize(meta["name"])] = pyproject.parent
    return found


def _declared(package_dir: Path, extras: Iterable[str], groups: Iterable[str] = ()) -> list[Requirement]:
    pyproject = tomllib.loads((package_dir / "pyproject.toml").read_text())
    meta = pyproject["project"]
    reqs = [Requirement(r) for r in meta.get("dependencies", [])]
    optional = meta.get("optional-dependencies", {})
    for extra in extras:
        reqs += [Requirement(r) for r in optional.get(extra, [])]
    for group in groups:
        reqs += [Requirement(r) for r in dependency_group(pyproject, group, package_dir.name)]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def dependency_group(pyproject: dict, group: str, where: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The requirement strings of ``[dependency-groups] group`` (PEP 735), ``{include-group = ...}`` expanded.
    A package without that group contributes nothing; an include of a missing group or a cycle is an error."""
    groups = {_normalize(k): v for k, v in pyproject.get("dependency-groups", {}).items()}
    key = _normalize(group)
    if key in seen:
        raise SystemExit(f"{where}: dependency group cycle {' -> '.join((*seen, key))}")
    if key not in groups:
        if seen:
            raise SystemExit(f"{where}: dependency group {seen[-1]!r} includes missing group {group!r}")
        return []
    found: list[str] = []
    for entry in groups[key]:
        if isinstance(entry, str):
            found.append(entry)
        else:
            found += dependency_group(pyproject, entry["include-group"], where, (*seen, key))
    return found


def resolve(
    package_dirs: list[Path], extras: Sequence[str], groups: Sequence[str] = ()
) -> tuple[list[Path], list[Requirement]]:
    """Return (workspace packages in dependency order, external requirements) for the closure. ``extras`` and
    ``groups`` apply to the packages of ``package_dirs`` only, not to the siblings they pull in."""
    siblings = workspace_packages()
    ordered: list[Path] = []
    external: dict[str, Requirement] = {}

    def visit(package_dir: Path, stack: tuple[Path, ...]) -> None:
        if package_dir in ordered:
            return
        if package_dir in stack:
            raise SystemExit(f"dependency cycle through {package_dir.name}")
        requested = package_dir in package_dirs
        for req in _declared(package_dir, extras if requested else [], groups if requested else []):
            key = _normalize(req.name)
            if key in siblings:
                visit(siblings[key], (*stack, package_dir))
            else:
                external.setdefault(key, req)
        ordered.append(package_dir)

    package_dirs = [p.resolve() for p in package_dirs]
    for package_dir in package_dirs:
        visit(package_dir, ())
    return ordered, list(external.values())


def _pip(python: str, args: list[str]) -> None:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _installed_requirements(python: str, dist: str) -> list[str]:
    code = f"import importlib.metadata as m, json; print(json.dumps(m.requires({dist!r}) or []))"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return [r for r in json.loads(out) if "extra ==" not in r]


def wheel_of(package_dir: Path, wheel_dir: Path) -> Path:
    """The one wheel of the workspace package in ``package_dir`` found in ``wheel_dir``."""
    name = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]["name"]
    found = sorted(wheel_dir.glob(f"{_normalize(name).replace('-', '_')}-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"expected one wheel of {name} in {wheel_dir}, found {[p.name for p in found]}")
    return found[0]


STAMP = "workspace-stack.sha256"  # in the environment's root: what its external requirements were installed from


def _stack_key(ordered: list[Path], constraints: Path, options: list, editable: bool) -> str:
    """Hash of everything the installs depend on: the constraints, each package's metadata (``pyproject.toml`` and,
    for a dynamic version, the version itself: an editable install's metadata keeps the version it was installed
    with), the options."""
    digest = hashlib.sha256(constraints.read_bytes())
    for package_dir in ordered:
        digest.update(package_dir.name.encode() + (package_dir / "pyproject.toml").read_bytes())
        digest.update(_dynamic_version(package_dir).encode())
    digest.update(json.dumps([*options, editable]).encode())
    return digest.hexdigest()


_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def _dynamic_version(package_dir: Path) -> str:
    """The ``__version__`` a dynamic ``version`` is read from (hatchling's ``[tool.hatch.version] path``,
    scikit-build-core's regex provider ``input``), or "" for a static version (already in ``pyproject.toml``)."""
    pyproject = tomllib.loads((package_dir / "pyproject.toml").read_text())
    if "version" not in pyproject["project"].get("dynamic", []):
        return ""
    tool = pyproject.get("tool", {})
    path = tool.get("hatch", {}).get("version", {}).get("path")
    path = path or tool.get("scikit-build", {}).get("metadata", {}).get("version", {}).get("input")
    if path is None:
        raise SystemExit(f"{package_dir.name}: dynamic version from an unknown source")
    found = _VERSION_LINE.search((package_dir / path).read_text())
    if found is None:
        raise SystemExit(f"{package_dir / path}: no __version__ = '...' line")
    return found.group(1)


def install(
    python: str,
    package_dirs: list[Path],
    constraints: Path,
    editable: bool,
    extras: list[str],
    additional: list[str],
    wheel_dir: Path | None = None,
    groups: list[str] | None = None,
) -> None:
    """Install the closure of ``package_dirs`` into ``python``'s environment. An environment already installed
    from the same constraints, package metadata and options (its stamp file says so) gets only the workspace
    packages reinstalled (wheels and non-editable builds; editable installs already follow the sources).
    ``groups``: ``[dependency-groups]`` of the packages of ``package_dirs`` to add (e.g. ``["test"]``)."""
    groups = groups or []
    ordered, external = resolve(package_dirs, extras, groups)
    stamp = Path(python).absolute().parent.parent / STAMP  # not resolved: a venv's python links out of it
    options = [sorted(extras), sorted(groups), sorted(additional)]
    key = _stack_key(ordered, constraints, options, editable and wheel_dir is None)
    if stamp.is_file() and stamp.read_text() == key:
        print(f"+ {stamp.parent}: requirements up to date (same constraints, metadata and options)", flush=True)
        if wheel_dir is not None or not editable:  # built from the current sources again
            _install_workspace(python, ordered, editable, wheel_dir, ["--force-reinstall"])
        return  # editable installs follow the sources; their metadata (entry points) is in the key
    stamp.unlink(missing_ok=True)
    _install_external(python, external, constraints, additional)
    _install_workspace(python, ordered, editable, wheel_dir, [])
    stamp.write_text(key)


def _install_workspace(
    python: str, ordered: list[Path], editable: bool, wheel_dir: Path | None, flags: list[str]
) -> None:
    for package_dir in ordered:
        if wheel_dir is not None:
            target = [str(wheel_of(package_dir, wheel_dir))]
        else:
            target = ["-e", str(package_dir)] if editable else [str(package_dir)]
        _pip(python, ["--no-deps", *flags, *target])


def _install_external(python: str, external: list[Requirement], constraints: Path, additional: list[str]) -> None:
    constraint_args = ["-c", str(constraints)]
    wants_torchrec = any(_normalize(r.name) == "torchrec" for r in external)
    plain = [str(r) for r in external if _normalize(r.name) != "torchrec"]
    if wants_torchrec:
        torchrec = next(r for r in external if _normalize(r.name) == "torchrec")
        # Resolve torch first (from the local CPU wheel), then torchrec alone, then its other needs.
        torch_first = [r for r in plain if _normalize(Requirement(r).name) == "torch"]
        _pip(python, [*constraint_args, *torch_first])
        _pip(python, [*constraint_args, "--no-deps", str(torchrec)])
        torchrec_needs = [
            r for r in _installed_requirements(python, "torchrec") if _normalize(Requirement(r).name) != CUDA_FBGEMM
        ]
        plain += [*torchrec_needs, CPU_FBGEMM]
    if plain or additional:
        _pip(python, [*constraint_args, *plain, *additional])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="+", type=Path, help="package directories, e.g. packages/dynamicemb")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints" / "cpu.txt")
    parser.add_argument("--editable", action="store_true", help="install workspace packages editable")
    parser.add_argument("--extra", action="append", default=[], help="optional dependencies (extra) to add")
    parser.add_argument("--group", action="append", default=[], help="[dependency-groups] table to add, e.g. test")
    parser.add_argument("--with", dest="additional", action="append", default=[], help="extra requirement")
    parser.add_argument("--wheels", type=Path, default=None, help="install workspace packages from wheels in DIR")
    args = parser.parse_args(argv)
    for package_dir in args.packages:
        if not (package_dir / "pyproject.toml").is_file():
            parser.error(f"{package_dir} is not a package directory (no pyproject.toml)")
    if args.wheels is not None and args.editable:
        parser.error("--wheels and --editable exclude each other")
    install(
        args.python,
        args.packages,
        args.constraints,
        editable=args.editable,
        extras=args.extra,
        additional=args.additional,
        wheel_dir=args.wheels,
        groups=args.group,
    )


if __name__ == "__main__":
    main()
