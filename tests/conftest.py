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


def gpu_backends_present() -> list[str]:
    """GPU backends this MNN build really has (none with the registry's wheel)."""
    from pytest_mnn_parity import backends

    return [b for b in ("OPENCL", "VULKAN", "CUDA") if backends.discover([b])[b].available]


# Tests that pin down what the registry's CPU-only wheel does (every GPU backend
# skipped) cannot hold on a GPU build; tests/test_gpu.py covers that case.
cpu_wheel_only = pytest.mark.skipif(bool(gpu_backends_present()),
                                    reason="asserts the CPU-only wheel's skips; this MNN build has GPU backends")


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
            if "could not fetch" in env.reason:
                pytest.skip(f"package registry unreachable: {env.reason}")
            pytest.fail(env.reason)
    return {env.version: env.python for env in made}
