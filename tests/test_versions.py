"""Other MNN releases as an axis (--mnn-versions) and the search for the release that changed (--mnn-bisect).

The real runs use the environments tests/test_cross_version.py uses (conftest.release_envs: MNN 3.4.0 and
3.6.1, made once by the plugin's own environment cache under .pytest_cache): each release runs in a worker
of its environment, the test process keeps its single MNN.  Without the package registry they skip.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NEW_RELEASE, OLD_RELEASE, read_report, results_by_nodeid
from pytest_mnn_parity.isolation.envs import EnvCache, between
from pytest_mnn_parity.isolation.versions import bisect
from pytest_mnn_parity.mnn.library import mnn_version

# An index URL nothing listens on, and pip told not to use an index at all: what an offline machine gives pip.
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2"}


# -- the search itself ---------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.sets(st.integers(0, n - 1)))))
def test_bisect_finds_the_one_change_point_in_logarithmic_steps(case):
    n, change, unavailable = case
    releases = [f"3.{i}.0" for i in range(n)]
    unavailable = {i for i in unavailable if 0 < i < n - 1}  # the ends are what the user asked about
    asked = []

    def judge(release):
        asked.append(release)
        index = releases.index(release)
        return None if index in unavailable else ("ok" if index < change else "zero_output")

    found = bisect(releases, judge)
    assert len(asked) == len(set(asked)) == len(found.steps)  # never the same release twice
    ran = [i for i in range(n) if i not in unavailable]
    if change == 0 or change >= n:
        assert not found.changed
    else:
        # The first release that ran at or after the change, and the last that ran before it.
        first = min(i for i in ran if i >= change)
        last = max(i for i in ran if i < change)
        assert (found.first_changed, found.last_same) == (releases[first], releases[last])
        assert found.verdicts[releases[first]] == "zero_output" and found.verdicts[releases[last]] == "ok"
    if not unavailable:
        assert len(asked) <= 2 + max(1, (n - 1).bit_length())


def test_between_orders_the_range_and_accepts_either_end_first():
    releases = ["3.0.0", "3.1.0", "3.2.0", "3.4.0", "3.4.1", "3.10.0"]
    assert between(releases, "3.1.0", "3.4.1") == ["3.1.0", "3.2.0", "3.4.0", "3.4.1"]
    assert between(releases, "3.4.1", "3.1.0") == ["3.4.1", "3.4.0", "3.2.0", "3.1.0"]
    assert between(releases, "3.4.0", "3.10.0") == ["3.4.0", "3.4.1", "3.10.0"]  # release order, not text order


def test_version_options_refuse_what_is_no_release_with_the_fix(pytester, models):
    models("multi_io.mnn")
    for args, said in ((["--mnn-versions", "3.4.0,latest"], "'latest' is not a release number"),
                       (["--mnn-bisect", "3.4.0"], "expected GOOD..BAD"),
                       (["--mnn-bisect", "3.4.0..3.4.0"], "a bisection needs two different ends"),
                       (["--mnn-versions", "3.4.0", "--mnn-bisect", "3.4.0..3.6.1"], "give one of them")):
        result = pytester.runpytest("--mnn-only", "--mnn-model", "multi_io.mnn", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        assert said in result.stderr.str(), (args, result.stderr.str())


def test_a_release_not_in_a_cold_cache_while_offline_skips_naming_what_it_would_download(pytester, models,
                                                                                        monkeypatch):
    """No network and no environment for 3.1.0: every item of that release skips with what pip would need."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    models("multi_io.mnn")
    cache = pytester.path / "cold-envs"
    result = pytester.runpytest("--mnn-only", "--mnn-model", "multi_io.mnn", "--mnn-backends", "CPU",
                                "--mnn-precisions", "high,low", "--mnn-versions", "3.1.0",
                                f"--mnn-env-cache={cache}", "-rs")
    result.assert_outcomes(skipped=2)
    text = result.stdout.str()
    assert f"mnn 3.1.0: not in the environment cache {cache}" in text
    assert "Creating it needs from the package index: mnn==3.1.0, numpy, pillow" in text
    assert f"CPython {sys.version_info.major}.{sys.version_info.minor}" in text
    assert not list(cache.glob("mnn-3.1.0-*/ready"))  # nothing half-made is left to be used later


# -- real runs in other releases -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_release_runs_in_its_own_environment_with_the_release_in_ids_and_report(pytester, models, release_envs):
    models("demo/lama_like.mnn", "multi_io.mnn")
    cache = release_envs[OLD_RELEASE].parents[2]
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn",
                                "--mnn-backends", "CPU,OPENCL", "--mnn-precisions", "high",
                                "--mnn-versions", f"{OLD_RELEASE},{NEW_RELEASE}", f"--mnn-env-cache={cache}",
                                "--mnn-report", "r.json", "-v")
    result.assert_outcomes(passed=4, skipped=4)
    text = result.stdout.str()
    for model in ("lama_like.mnn", "multi_io.mnn"):
        for release in (OLD_RELEASE, NEW_RELEASE):
            assert f"{model}::parity[mnn{release}-CPU-high] PASSED" in text
            assert f"{model}::parity[mnn{release}-OPENCL-high] SKIPPED" in text
    report = read_report(pytester.path / "r.json")
    assert report["mnn_version"] == mnn_version() and report["settings"]["mnn_versions"] == [OLD_RELEASE, NEW_RELEASE]
    by_id = results_by_nodeid(report)
    old = by_id[f"lama_like.mnn::parity[mnn{OLD_RELEASE}-CPU-high]"]
    # The release is what the worker's own MNN said, not what was asked: it really ran there.
    assert old["mnn_version"] == OLD_RELEASE and old["worker"]["pid"] != os.getpid()
    # One reference for every release: the test process's, computed once.
    assert old["reference"].endswith(f"MNN {mnn_version()} (the test process)")
    assert by_id[f"lama_like.mnn::parity[mnn{OLD_RELEASE}-OPENCL-high]"]["mnn_version"] == OLD_RELEASE
    assert f"mnn{OLD_RELEASE}-CPU-high" in text and f"mnn{NEW_RELEASE}-CPU-high" in text  # matrix columns
    for release in (OLD_RELEASE, NEW_RELEASE):
        assert f"MNN {release}: {release_envs[release]} (cached)" in text


@pytest.mark.slow
def test_a_warm_cache_works_offline_and_bisects_a_range_of_two(pytester, models, release_envs, monkeypatch):
    """The environments and the release list are cached: with the index unreachable, nothing is downloaded or
    created, and the bisection over a synthetic two-release index checks both ends and says no change."""
    cache = release_envs[OLD_RELEASE].parents[2]
    readies = {p: p.stat().st_mtime_ns for p in cache.glob("mnn-*/ready")}
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    index = pytester.path / "envs"
    index.mkdir()
    # A synthetic index of two releases, beside the two cached environments (linked, not copied).
    for release, python in release_envs.items():
        (index / python.parents[1].name).symlink_to(python.parents[1])
    (index / "mnn-releases.json").write_text(json.dumps({"time": 9e99, "releases": [OLD_RELEASE, NEW_RELEASE]}))
    assert EnvCache(index).releases() == [OLD_RELEASE, NEW_RELEASE]
    models("multi_io.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "multi_io.mnn", "--mnn-backends", "CPU",
                                "--mnn-precisions", "high,low", "--mnn-bisect", f"{OLD_RELEASE}..{NEW_RELEASE}",
                                f"--mnn-env-cache={index}", "--mnn-report", "r.json", "-v")
    result.assert_outcomes(passed=2)
    text = result.stdout.str()
    assert f"multi_io.mnn::parity[bisect{OLD_RELEASE}..{NEW_RELEASE}-CPU-high] PASSED" in text
    assert f"no change between {OLD_RELEASE} and {NEW_RELEASE} (checked {OLD_RELEASE}, {NEW_RELEASE})" in text
    found = results_by_nodeid(read_report(pytester.path / "r.json"))[
        f"multi_io.mnn::parity[bisect{OLD_RELEASE}..{NEW_RELEASE}-CPU-low]"]["bisect"]
    assert found["steps"] == [OLD_RELEASE, NEW_RELEASE] and found["first_changed"] is None
    assert set(found["verdicts"].values()) == {"ok"} and found["metrics"][OLD_RELEASE].startswith("ok: max|d|")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("mnn-*/ready")} == readies  # reused, none remade
    assert "(created in" not in text
