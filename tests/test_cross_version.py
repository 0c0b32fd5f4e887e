"""Two MNN releases from the package registry, each in its own virtual environment: a bundle saved by
one is compared by the other, in both directions, on the fixture models.

Each environment gets the package's own dependencies (pyproject.toml) with MNN pinned, and this
checkout's plugin. They are made by the plugin's own environment cache (``isolation/envs.py``, locked between
xdist workers) under pytest's cache directory (``.pytest_cache/d/mnn-parity-venvs``, keyed by the dependency
list), shared with tests/test_versions.py, so only the first run pays for the installs (about half a minute).
Without the package registry the test skips with the reason, and so it does when the registry has no wheel of
a release for this Python (named in the skip); any other failure to make an environment fails
(conftest.release_env_problem: pip's "No matching distribution found" means either, so the registry is asked).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FIXTURES, NEW_RELEASE, OLD_RELEASE, REPO

pytestmark = pytest.mark.slow

OLD, NEW = OLD_RELEASE, NEW_RELEASE
MODELS = ("demo/lama_like.mnn", "multi_io.mnn")


@pytest.fixture(scope="module")
def pythons(release_envs) -> dict[str, Path]:
    return release_envs


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
