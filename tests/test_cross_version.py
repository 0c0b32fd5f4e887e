"""Two MNN releases from the package registry, each in its own virtual environment: a bundle saved by
one is compared by the other, in both directions, on the fixture models.

Each environment gets the package's own dependencies (pyproject.toml) with MNN pinned, and this
checkout's plugin. They are cached under pytest's cache directory (``.pytest_cache/d/mnn-parity-venvs``,
keyed by the dependency list), so only the first run pays for the installs (about half a minute).
Without the package registry the test skips with the reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO

pytestmark = pytest.mark.slow

OLD, NEW = "3.4.0", "3.6.1"
MODELS = ("demo/lama_like.mnn", "multi_io.mnn")
_OFFLINE = ("No matching distribution found", "Could not find a version", "NewConnectionError",
            "Temporary failure in name resolution", "Network is unreachable", "Max retries exceeded",
            "Failed to establish a new connection", "ProxyError", "Name or service not known")


def requirements(version: str) -> list[str]:
    """The package's own dependencies (pyproject.toml), with MNN pinned to ``version``."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
    assert any(re.match(r"(?i)mnn\b", d) for d in deps), deps
    return [f"mnn=={version}" if re.match(r"(?i)mnn\b", d) else d for d in deps]


def _venv(root: Path, version: str) -> tuple[Path | None, str]:
    """(python of a venv with the package's dependencies and mnn==version; or None and pip's output)."""
    reqs = requirements(version)
    tag = zlib.crc32(" ".join(reqs).encode())  # another dependency list, another environment
    folder = root / f"mnn-{version}-py{sys.version_info.major}{sys.version_info.minor}-{tag:08x}"
    python = folder / ("Scripts" if os.name == "nt" else "bin") / "python"
    ready = folder / "ready"
    if ready.is_file() and python.exists():
        return python, ""
    shutil.rmtree(folder, ignore_errors=True)  # half-made by an interrupted run
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *reqs],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None, proc.stdout + proc.stderr
    ready.write_text(version)
    return python, ""


@pytest.fixture(scope="module")
def pythons(request, tmp_path_factory) -> dict[str, Path]:
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("mnn-parity-venvs") if cache is not None else tmp_path_factory.mktemp("venvs")
    with ThreadPoolExecutor(2) as pool:
        made = dict(zip((OLD, NEW), pool.map(lambda v: _venv(Path(root), v), (OLD, NEW))))
    for version, (python, log) in made.items():
        if python is None:
            tail = log.strip().splitlines()[-1] if log.strip() else "no output"
            if any(sign in log for sign in _OFFLINE):
                pytest.skip(f"package registry unreachable: cannot install mnn=={version} ({tail})")
            pytest.fail(f"pip could not install {' '.join(requirements(version))}:\n{log[-3000:]}")
    return {version: python for version, (python, _) in made.items()}


def _pytest(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # Only this checkout's plugin, whatever else is installed: autoload off, the plugin named.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    argv = [str(python), "-m", "pytest", "-p", "pytest_mnn_parity.plugin.hooks", "-p", "no:cacheprovider", "--mnn-only",
            "--mnn-backends", "CPU,METAL"]
    for model in MODELS:
        argv += ["--mnn-model", Path(model).name]
    return subprocess.run([*argv, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_bundle_saved_by_one_mnn_release_is_compared_by_another(pythons, tmp_path):
    for model in MODELS:
        shutil.copyfile(FIXTURES / model, tmp_path / Path(model).name)

    # The plugin itself on the old release: probes, discovery, every CPU precision, the bundle.
    old = _pytest(pythons[OLD], tmp_path, "--mnn-save-outputs", "old", "--mnn-report", "old.json")
    assert old.returncode == 0, old.stdout[-3000:] + old.stderr[-2000:]
    report = _report(tmp_path / "old.json")
    assert report["mnn_version"] == OLD and report["summary"] == {"passed": 8, "skipped": 8}
    assert {r["arithmetic"]["kind"] for r in report["results"] if r["outcome"] == "passed"} <= {"fp32", "fp16", "bf16"}
    index = _report(tmp_path / "old" / "mnn-bundle.json")
    assert index["mnn_versions"] == [OLD] and len(index["entries"]) == 10

    for ref in ("old", "old::same", "old::CPU-low"):
        new = _pytest(pythons[NEW], tmp_path, "--mnn-reference", ref, "--mnn-report", "new.json")
        assert new.returncode == 0, new.stdout[-3000:]
        report = _report(tmp_path / "new.json")
        assert report["mnn_version"] == NEW and report["summary"] == {"passed": 8, "skipped": 8}
        for rec in report["results"]:
            if rec["outcome"] == "passed":
                assert rec["reference_label"] == f"bundle {ref if '::' in ref else ref + '::reference'}"
                assert f"MNN {OLD} on" in rec["reference"], rec["reference"]
        assert "reference" in new.stdout and f"bundle {ref}" in new.stdout

    # Other inputs than the bundle's are refused, naming both hashes and the fix.
    seeded = _pytest(pythons[NEW], tmp_path, "--mnn-reference", "old", "--mnn-seed", "4")
    assert seeded.returncode == 1
    assert "input-set hash mismatch" in seeded.stdout and "fix: run with --mnn-seed 0" in seeded.stdout

    # And back: the new release's bundle read by the old release.
    saved = _pytest(pythons[NEW], tmp_path, "--mnn-save-outputs", "new")
    assert saved.returncode == 0, saved.stdout[-3000:]
    back = _pytest(pythons[OLD], tmp_path, "--mnn-reference", "new::same", "--mnn-report", "back.json")
    assert back.returncode == 0, back.stdout[-3000:]
    assert all(f"MNN {NEW} on" in r["reference"] for r in _report(tmp_path / "back.json")["results"]
               if r["outcome"] == "passed")
