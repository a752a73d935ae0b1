"""Every build, test and benchmark entry point of the workspace.

python3 -m pip install nox
nox -s demo          # train a small ranking GR on the embedded synthetic data (CPU)
nox -s tests         # unit tests of every package but the slow ones, CPU, one shared environment
nox -s "tests(package='dynamicemb')"   # one package's
nox -s lint tests slow integration   # what CI runs (.ci/run)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "tools"))
import install_stack  # noqa: E402

nox.options.default_venv_backend = "venv"
# Environments are kept between runs; tools/install_stack.py reinstalls their requirements only when the
# constraints, a package's pyproject.toml or the options changed (a stamp file in each environment).
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
CONSTRAINTS = ROOT / "constraints" / "cpu.txt"
PACKAGES = {
    "hstu-attn": "hstu_attn",
    "dynamicemb": "dynamicemb",
    "gr-parallel": "gr_parallel",
    "gr-checkpoint": "gr_checkpoint",
    "gr-models": "gr_models",
}
TEST_GROUP = "test"  # each package's [dependency-groups] table of test tools (PEP 735)
# Packages with integration tests of their use without the rest of the workspace (integration_tests/alone/).
ALONE = ["dynamicemb", "hstu-attn"]
CPU_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}


def _python(session: nox.Session) -> str:
    return str(Path(session.virtualenv.location) / "bin" / "python")


def _install(
    session: nox.Session,
    packages: list[str],
    *,
    editable: bool,
    extras: list[str] | None = None,
    wheel_dir: Path | None = None,
    groups: tuple[str, ...] = (TEST_GROUP,),
    tools: tuple[str, ...] = (),
) -> None:
    """``packages`` with their declared dependencies, ``extras``, the dependency ``groups`` of ``packages`` and the
    further requirements ``tools``, pinned by the constraints (tools/install_stack.py)."""
    install_stack.install(
        _python(session),
        [ROOT / "packages" / p for p in packages],
        CONSTRAINTS,
        editable=editable,
        extras=extras or [],
        additional=list(tools),
        wheel_dir=wheel_dir,
        groups=list(groups),
    )


def _build_dists(session: nox.Session, packages: list[str], dist: Path) -> None:
    """sdist and wheel (built from the sdist) of each package into ``dist``, with the session's ``build``."""
    for package in packages:
        session.run(
            "python",
            "-m",
            "build",
            "--outdir",
            str(dist),
            f"packages/{package}",
            env={"HSTU_ATTN_BUILD_CUDA": os.environ.get("HSTU_ATTN_BUILD_CUDA", "0")},
        )


@nox.session(python=PYTHON, default=False)
def test_env(session: nox.Session) -> None:
    """The environment `tests` and `slow` share (they require this session): every package editable with its test
    group and dynamicemb's storage extras, so the torch stack is installed once, not once per package."""
    _install(session, list(PACKAGES), editable=True, extras=["rocksdb", "redis"])
    # CUTLASS headers only (the wheel's Python dependencies are not needed) for hstu-attn's slow sm_90a compile test,
    # tests/test_cutlass_sm90_sass.py; where the wheel cannot be fetched that test skips and names what is missing.
    session.run("python", "-m", "pip", "install", "-q", "--no-deps", "nvidia-cutlass==4.2.0.0", success_codes=[0, 1])


def _pytest_in_test_env(session: nox.Session, packages: list[str], marker: str) -> None:
    """pytest with ``-m marker`` over the tests of ``packages``, in test_env's interpreter; posargs follow (a later
    ``-m`` overrides the marker). pytest exits 5 when it collected nothing: that fails the session, as it should."""
    python = session.env_dir.parent / "test_env" / "bin" / "python"
    if not python.is_file():
        session.error(f"{python} is missing: run the test_env session first (nox runs it before this one)")
    paths = [f"packages/{p}/tests" for p in packages]
    session.run(str(python), "-m", "pytest", "-m", marker, *paths, *session.posargs, env=CPU_ENV, external=True)


@nox.session(venv_backend="none", requires=["test_env"])
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Unit tests of one package on CPU but those marked slow, in the shared test_env (`nox -s tests`: every
    package, one session each, one environment)."""
    _pytest_in_test_env(session, [package], "not slow")


@nox.session(venv_backend="none", requires=["test_env"])
def slow(session: nox.Session) -> None:
    """The tests marked slow (multi-process harnesses, compile tests for GPU targets, multi-minute runs) of every
    package, in one pytest run in test_env. CI runs them (.ci/run)."""
    _pytest_in_test_env(session, list(PACKAGES), "slow")


@nox.session(python=PYTHON)
@nox.parametrize("stack", ["all", *ALONE])
def integration(session: nox.Session, stack: str) -> None:
    """End-to-end tests (CPU, multi-process with gloo) against the wheels that `nox -s build` makes, installed
    (not editable) in a fresh environment. stack='all': every package, integration_tests/ but alone/;
    stack=<package>: that package alone with its declared dependencies, integration_tests/alone/<package>/."""
    packages = list(PACKAGES) if stack == "all" else [stack]
    dist = Path(session.create_tmp()) / "dist"
    for old in dist.glob("*"):
        old.unlink()
    session.install("-c", str(CONSTRAINTS), "build")
    _build_dists(session, packages, dist)
    # The packages' test groups only (hstu-attn's has numpy, which Triton's interpreter needs).
    _install(session, packages, editable=False, wheel_dir=dist)
    if stack == "all":
        paths = ["integration_tests", "--ignore=integration_tests/alone"]
    else:
        others = [m for p, m in PACKAGES.items() if p != stack]
        check = (
            f"import importlib.util as u; found = [m for m in {others!r} if u.find_spec(m)]; assert not found, found"
        )
        session.run("python", "-c", check)  # no other workspace package is installed
        paths = [f"integration_tests/alone/{PACKAGES[stack]}"]
    session.run("python", "-m", "pytest", *paths, *session.posargs, env={**CPU_ENV, "INTEGRATION_FROM_WHEELS": "1"})


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PACKAGES))
def isolated(session: nox.Session, package: str) -> None:
    """Fresh environment with one package, its declared dependencies and its test group only: import it, run its
    tests (the slow ones too)."""
    _install(session, [package], editable=False)
    session.run("python", "-c", f"import {PACKAGES[package]} as m; print(m.__name__, m.__version__)")
    # Run from the package folder so the workspace sources are not importable, only the installed wheel.
    with session.chdir(ROOT / "packages" / package):
        session.run(
            "python",
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "tests",
            *session.posargs,
            env=CPU_ENV,
        )


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Train the default synthetic ranking GR on CPU and print its metrics."""
    _install(session, ["gr-models"], editable=True, groups=())
    session.run(
        "gr-train",
        "--config",
        "packages/gr-models/configs/synthetic_ranking.yaml",
        *session.posargs,
        env={"OMP_NUM_THREADS": "2"},
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole workspace."""
    session.install("-c", str(CONSTRAINTS), "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the public packages."""
    _install(session, list(PACKAGES), editable=True)
    session.install("-c", str(CONSTRAINTS), "mypy")
    session.run("mypy", *[f"packages/{p}/src/{m}" for p, m in PACKAGES.items()])


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PACKAGES))
def build(session: nox.Session, package: str) -> None:
    """sdist and wheel of one package into dist/ (`nox -s build`: every package)."""
    session.install("build")
    dist = ROOT / "dist"
    prefix = package.replace("-", "_") + "-"
    for old in [*dist.glob(f"{prefix}*.whl"), *dist.glob(f"{prefix}*.tar.gz")]:
        if "linux_" not in old.name:  # build_cuda's platform wheel of hstu-attn stays
            old.unlink()
    _build_dists(session, [package], dist)
    built = sorted(p.name for p in [*dist.glob(f"{prefix}*.whl"), *dist.glob(f"{prefix}*.tar.gz")])
    if not any(name.endswith(".whl") for name in built):
        session.error(f"no wheel of {package} was built")
    session.log("built: " + ", ".join(built))


@nox.session(python=PYTHON)
def build_cuda(session: nox.Session) -> None:
    """hstu-attn's wheel with the CUTLASS library (`libhstu_attn_cutlass.so`) into dist/. Needs nvcc; the
    CUTLASS headers come from the nvidia-cutlass wheel installed here (or CUTLASS_INCLUDE_DIR). Architectures:
    `nox -s build_cuda -- -C cmake.define.HSTU_ATTN_CUDA_ARCHS=80` (default 80;90a)."""
    session.install("build", "scikit-build-core>=0.10", "cmake>=3.24", "ninja", "nvidia-cutlass==4.2.0.0")
    dist = ROOT / "dist"
    for old in dist.glob("hstu_attn-*-linux_*.whl"):
        old.unlink()
    session.run(
        "python", "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), "packages/hstu-attn",
        *session.posargs, env={"HSTU_ATTN_BUILD_CUDA": "1"},
    )  # fmt: skip
    wheels = sorted(p.name for p in dist.glob("hstu_attn-*-linux_*.whl"))
    if not wheels:
        session.error("no platform wheel of hstu-attn was built")
    session.log("wheel: " + ", ".join(wheels))


@nox.session(venv_backend="none")
def gpu_wheels(session: nox.Session) -> None:
    """(CPU machine) Download the cp312 wheels the GPU machine needs into .gpu-wheels/."""
    session.run("bash", "tools/gpu/fetch_wheels.sh", external=True)


@nox.session(venv_backend="none")
def gpu_setup(session: nox.Session) -> None:
    """(GPU machine) Install the carried wheels and the packages, print versions, run pytest -m gpu."""
    session.run("bash", "tools/gpu/setup.sh", *session.posargs, external=True)


@nox.session(venv_backend="none")
def quality(session: nox.Session) -> None:
    """ML-1M (users 1-2999) quality, issue 26. `nox -s quality -- smoke`: tools/gpu/quality_ml1m.sh's logic on CPU at
    smoke size (first 60 users, 1 epoch, every model; JSONs in a temporary folder). On the GPU machine, after
    gpu_setup, `nox -s quality [-- key=value ...]` (default device=cuda): tools/quality.py run (SASRec, full-softmax
    SASRec, HSTU, HSTU-large, 3 seeds, early stopping) then ranking (RankingGR vs DLRM, 3 seeds) in this one process
    into benchmarks/results; tools/gpu/quality_ml1m.sh runs the same in parallel processes within one device call.
    Plot the curves with tools/quality.py plot."""
    if session.posargs == ["smoke"]:
        with tempfile.TemporaryDirectory() as out:
            env = {"QUALITY_SMOKE": "1", "OUT": out, "PYTHON": sys.executable}
            session.run("bash", "tools/gpu/quality_ml1m.sh", env=env, external=True)
        return
    results = ROOT / "packages" / "gr-models" / "benchmarks" / "results"
    overrides = session.posargs or ["device=cuda"]
    session.run(
        sys.executable, "tools/quality.py", "run", "--models", "sasrec", "sasrec_full_softmax", "hstu", "hstu_large",
        "--out", str(results / "quality-ml1m.json"), "--curves", str(results / "quality-ml1m-curves.json"),
        "--", *overrides, external=True,
    )  # fmt: skip
    session.run(
        sys.executable, "tools/quality.py", "ranking", "--out", str(results / "quality-ml1m-ranking.json"),
        "--", *overrides, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """(GPU machine, after gpu_setup) Run the benchmark scripts named in posargs, or all of them."""
    scripts = session.posargs or sorted(str(p) for p in ROOT.glob("packages/*/benchmarks/bench_*.py"))
    for script in scripts:
        session.run(sys.executable, script, external=True)


@nox.session(venv_backend="none")
def bench_e2e(session: nox.Session) -> None:
    """(GPU machine, after gpu_setup) End-to-end training throughput of the ranking GR: tools/bench_e2e.py."""
    session.run(sys.executable, "tools/bench_e2e.py", *session.posargs, external=True)
