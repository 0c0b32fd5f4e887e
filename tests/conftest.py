"""Shared test helpers: paths to the real fixture models and a pytester set-up."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_mnn_parity.mnn.library import mnn

# pytester's in-process runs drop modules first imported inside them; pymnn's C
# code looks MNN up in sys.modules, so MNN must be imported before any run.
mnn()
# The same for onnx and onnxruntime: importing their protobuf extensions a second
# time in one process aborts it (duplicate descriptor registration).
import onnx  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401


def _import_the_whole_plugin() -> None:
    """The plugin imports its engine on first use (a pytest run without models never does).  Inside a pytester
    run that first use would import a module that the run then drops again, and the next run's fresh copy is
    another module: classes and functions pickled for the isolated workers no longer match.  So all of it now."""
    import importlib
    import pkgutil

    import pytest_mnn_parity

    for info in pkgutil.walk_packages(pytest_mnn_parity.__path__, "pytest_mnn_parity."):
        if not info.name.endswith(".worker"):  # the worker's module runs as a script (python -m)
            importlib.import_module(info.name)


_import_the_whole_plugin()

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
DEMO = FIXTURES / "demo" / "lama_like.mnn"
COLLAPSE = FIXTURES / "collapse"
COLLAPSE_CATEGORIES = {
    "zero": "zero_output",
    "partial_zero": "partial_zero",
    "constant": "constant_output",
    "non_finite": "non_finite",
    # stale.fp16.mnn's output ignores its input on every backend (its conversion made it so): that is a broken
    # build, a mismatch, not a backend that failed to recompute (issue 20); stale_output itself is unit-tested.
    "stale": "mismatch",
    "mismatch": "mismatch",
}


@pytest.fixture
def models(pytester: pytest.Pytester):
    """Copy fixture models into the pytester directory so node ids are short and stable."""

    def copy(*relative: str, rename: str | None = None) -> list[Path]:
        out = []
        for rel in relative:
            src = FIXTURES / rel
            dst = pytester.path / (rename or src.name)
            shutil.copyfile(src, dst)
            out.append(dst)
        return out

    return copy


def read_report(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["schema"] == "pytest-mnn-parity/1"
    return data


def results_by_nodeid(report: dict) -> dict[str, dict]:
    return {r["nodeid"]: r for r in report["results"]}


def plugin_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that must import this checkout's plugin whatever its working directory
    (a relative PYTHONPATH=src would point elsewhere)."""
    import os

    import pytest_mnn_parity

    env = dict(os.environ, **extra)
    root = str(Path(pytest_mnn_parity.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# The GPU job sets these (docs/gpu.md, "Run the test suite on the lent GPU machine"):
# MNN_PARITY_GPU_BUILD=1 says the MNN under test is the GPU build; MNN_PARITY_REQUIRE_GPU=OPENCL,VULKAN,CUDA makes
# each test of tests/test_gpu.py fail, instead of skip, where that backend is not really there.
GPU_BUILD_ENV = "MNN_PARITY_GPU_BUILD"
REQUIRE_GPU_ENV = "MNN_PARITY_REQUIRE_GPU"
# The backends the GPU build in shared/gpu has (its README); the registry's wheel has none of them.
GPU_BUILD_BACKENDS = ("OPENCL", "VULKAN", "CUDA")


def gpu_build() -> str:
    """Why the MNN under test is a GPU build ("" for the registry's CPU-only wheel).

    Decided from the installed files and the GPU job's environment, never from backend discovery: discovery is
    code under test, and a discovery that wrongly found a GPU must not skip the tests that guard against it.
    """
    import importlib.util
    import os

    flag = os.environ.get(GPU_BUILD_ENV, "").strip()
    if flag not in ("", "0"):
        return f"{GPU_BUILD_ENV}={flag}"
    spec = importlib.util.find_spec("MNN")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = gpu_build_files(Path(folder))
        if found:
            return found
    return ""


def gpu_build_files(package: Path) -> str:
    """What in the installation of the ``MNN`` package folder ``package`` shows a GPU build ("" if nothing): the
    GPU wheel's ``mnn_gpu_libs`` beside it, or its distribution's version (``3.6.1+gpu``) in the metadata there."""
    for where in (package, package.parent):
        if (where / "mnn_gpu_libs").is_dir():
            return f"{where / 'mnn_gpu_libs'} exists"
    for meta in sorted(package.parent.glob("[mM][nN][nN]-*.dist-info/METADATA")):
        version = next((line.split(":", 1)[1].strip() for line in meta.read_text(errors="replace").splitlines()
                        if line.startswith("Version:")), "")
        if "+gpu" in version:
            return f"{meta.parent.name} is version {version}"
    return ""


def gpu_backends_present() -> list[str]:
    """GPU backends this MNN build really has: none with the registry's CPU-only wheel (whatever discovery says,
    so a discovery that claims a GPU fails the tests that show the CPU wheel's output)."""
    from pytest_mnn_parity import backends

    if not gpu_build():
        return []
    return [b for b in GPU_BUILD_BACKENDS if backends.discover([b])[b].available]


# Tests that pin down what the registry's CPU-only wheel does (every GPU backend
# skipped) cannot hold on a GPU build; tests/test_gpu.py covers that case.
cpu_wheel_only = pytest.mark.skipif(bool(gpu_build()),
                                    reason="asserts the CPU-only wheel's skips; this MNN is a GPU build")


def required_gpus() -> list[str]:
    """The backends MNN_PARITY_REQUIRE_GPU names (a GPU job's demand), upper case."""
    import os

    return [b.strip().upper() for b in os.environ.get(REQUIRE_GPU_ENV, "").split(",") if b.strip()]


def require_backend(backend: str) -> None:
    """Skip a GPU test where ``backend`` is not really there, with the reason; fail instead where the GPU job
    requires it (MNN_PARITY_REQUIRE_GPU), so a broken GPU box (a wrong probe answer, a failed session) is red."""
    from pytest_mnn_parity import backends

    status = backends.discover([backend])[backend]
    if status.available:
        return
    if backend.upper() in required_gpus():
        pytest.fail(f"{backend} is required ({REQUIRE_GPU_ENV}={','.join(required_gpus())}) but unavailable: "
                    f"{status.reason}", pytrace=False)
    pytest.skip(status.reason)


# -- other MNN releases ------------------------------------------------------------------------------------------
# The releases the cross-version tests install (tests/test_cross_version.py, tests/test_versions.py): one cache
# folder and the same environments for both, so CI pays for each release once.
OLD_RELEASE, NEW_RELEASE = "3.4.0", "3.6.1"
RELEASE_ENVS = "mnn-parity-venvs"


def release_requirements(version: str) -> list[str]:
    """The package's own dependencies (pyproject.toml), with MNN pinned to ``version``."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
    assert any(re.match(r"(?i)mnn\b", d) for d in deps), deps
    return [f"mnn=={version}" if re.match(r"(?i)mnn\b", d) else d for d in deps]


def release_env_root(config: pytest.Config, tmp_path_factory) -> Path:
    cache = getattr(config, "cache", None)
    return Path(cache.mkdir(RELEASE_ENVS)) if cache is not None else tmp_path_factory.getbasetemp() / RELEASE_ENVS


@pytest.fixture(scope="session")
def release_envs(request, tmp_path_factory) -> dict[str, Path]:
    """{release: its environment's python} for OLD_RELEASE and NEW_RELEASE, made once (locked between xdist
    workers) by the plugin's own environment cache; skips with pip's reason without the package registry."""
    from concurrent.futures import ThreadPoolExecutor

    from pytest_mnn_parity.isolation.envs import EnvCache

    cache = EnvCache(release_env_root(request.config, tmp_path_factory))
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda v: cache.ensure(v, release_requirements(v)), (OLD_RELEASE, NEW_RELEASE)))
    for env in made:
        if not env.ok:
            # pip says "No matching distribution found" both offline and for a release without a wheel for this
            # Python: ask the registry itself which of the two it is, so a real failure never skips.
            fetch_failed = "could not fetch" in env.reason
            reachable = not fetch_failed or registry_versions("pip") is not None
            listed = registry_versions("mnn") if fetch_failed and reachable else None
            action, message = release_env_problem(env.version, env.reason, reachable=reachable, listed=listed)
            (pytest.skip if action == "skip" else pytest.fail)(message)
    return {env.version: env.python for env in made}


def registry_versions(package: str) -> list[str] | None:
    """The versions of ``package`` the package registry has for this Python and platform (``pip index
    versions``), or None when pip could not get an answer from the registry."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package,
                               "--disable-pip-version-check"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    import re

    found = re.search(r"^Available versions:\s*(.*)$", proc.stdout, re.M)
    return [v.strip() for v in found.group(1).split(",") if v.strip()] if found else []


def release_env_problem(version: str, reason: str, *, reachable: bool, listed: list[str] | None) -> tuple[str, str]:
    """("skip" or "fail", message) for a release environment that could not be made: skip only when the
    registry cannot be reached, or it has no wheel of that release for this Python; fail on anything else."""
    import platform

    python = f"Python {platform.python_version()} ({platform.system()} {platform.machine()})"
    if not reachable:
        return "skip", f"package registry unreachable: {reason}"
    if listed is not None and version not in listed:
        return "skip", (f"mnn {version} has no wheel for {python} on the package registry (it has "
                        f"{', '.join(listed) or 'none'} for this Python): {reason}")
    return "fail", f"the package registry is reachable and lists mnn {version} for {python}, yet: {reason}"
