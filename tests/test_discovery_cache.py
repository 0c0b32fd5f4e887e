"""Backend discovery and the arithmetic probes are kept in pytest's cache between runs (issue 22): a GPU's take
seconds every run.  The key is what can change their results (``kept_results.discovery_key``).  Probes are counted
in every process that makes one (the run's workers too) through ``MNN_PARITY_PROBE_LOG``."""
from __future__ import annotations

import json

import pytest
from conftest import read_report

from pytest_mnn_parity.mnn import backends
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.mnn import kept_results

ARGS = ("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU,OPENCL", "--mnn-precisions",
        "high,low", "--mnn-report", "r.json")


def probes(log) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def run(pytester: pytest.Pytester, monkeypatch, log, *extra: str) -> tuple[list[str], dict]:
    """One pytest run in a fresh interpreter (this process's own discovery would hide the cache); its probes
    and its verdicts."""
    if log.exists():
        log.unlink()
    monkeypatch.setenv("MNN_PARITY_PROBE_LOG", str(log))
    result = pytester.runpytest_subprocess(*ARGS, *extra)
    assert result.ret == 0, result.stdout.str()
    verdicts = {r["nodeid"]: (r["outcome"], r["category"], r["message"]) for r in
                read_report(pytester.path / "r.json")["results"]}
    return probes(log), verdicts


def test_a_second_run_probes_nothing_and_judges_the_same(pytester, models, monkeypatch, tmp_path):
    models("demo/lama_like.mnn")
    monkeypatch.delenv("MNN_PARITY_DISABLE_BACKENDS", raising=False)
    log = tmp_path / "probes.log"
    # The default isolation: the backends are probed in the parent (CPU) and in the warm worker (the others),
    # the arithmetic in the worker that runs the configuration; all of it is kept by the parent.
    cold, first = run(pytester, monkeypatch, log)
    assert {"backend CPU", "backend OPENCL", "arithmetic CPU-high", "arithmetic CPU-low"} <= set(cold)
    warm, second = run(pytester, monkeypatch, log)
    assert warm == [], f"the second run probed again: {warm}"
    assert second == first
    kept = json.loads((pytester.path / ".pytest_cache" / "v" / "mnn-parity" / "discovery").read_text())
    assert kept["key"] == kept_results.discovery_key()
    assert {s["name"] for s in kept["results"]["statuses"]} >= {"CPU", "OPENCL"}

    # --cache-clear empties pytest's cache: everything is probed again (in-process now: the cheaper run).
    cleared, third = run(pytester, monkeypatch, log, "--cache-clear", "--mnn-isolate", "never")
    assert set(cleared) == set(cold)
    assert third == first

    # The key holds MNN_PARITY_DISABLE_BACKENDS: disabling a backend is a new key, so nothing kept is believed.
    monkeypatch.setenv("MNN_PARITY_DISABLE_BACKENDS", "OPENCL")
    again, verdicts = run(pytester, monkeypatch, log, "--mnn-isolate", "never")
    assert "backend CPU" in again and "backend OPENCL" not in again
    assert all("disabled by MNN_PARITY_DISABLE_BACKENDS" in message for nodeid, (_, _, message) in verdicts.items()
               if "OPENCL" in nodeid)


def test_the_key_names_what_can_change_a_probe(monkeypatch):
    monkeypatch.delenv("MNN_PARITY_DISABLE_BACKENDS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plain = kept_results.discovery_key()
    assert "_mnncengine" in plain["mnn"], plain  # the MNN build: the extension's file
    monkeypatch.setenv("MNN_PARITY_DISABLE_BACKENDS", "VULKAN")
    assert kept_results.discovery_key() != plain
    monkeypatch.delenv("MNN_PARITY_DISABLE_BACKENDS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert kept_results.discovery_key() != plain
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert kept_results.discovery_key() == plain


def test_results_survive_their_json_form():
    """What is kept is what was found: the JSON round trip gives the same statuses and arithmetic back."""
    status = backends.discover(["CPU"])["CPU"]
    arithmetic = mnn_arithmetic.probe_arithmetic("CPU", "high")
    data = json.loads(json.dumps(kept_results.known_results()))
    kept = {s["name"]: backends.BackendStatus(**s) for s in data["statuses"]}
    assert kept["CPU"] == status
    found = {(b, p): mnn_arithmetic.Arithmetic(**a) for b, p, a in data["arithmetic"]}
    assert found[("CPU", "high")] == arithmetic
