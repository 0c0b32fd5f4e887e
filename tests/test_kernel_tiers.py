"""A model's tier follows the kernels it runs (issue 20's GPU fp32 residue): where a kernel probe finds a kernel
rounding looser than the configuration's elementwise path, a model that runs that kernel gets its tier and says why.

On this CPU every kernel probe reads fp32 (the real measurement is checked first). CUDA 'high' on the H200 keeps
depthwise weights in half precision while its elementwise probes read fp32 (docs/verdicts.md); that finding is
*simulated* here, as the probe's recorded result handed to real MNN sessions on real fixture models, and measured
for real by tests/test_gpu.py on the GPU build.
"""
from __future__ import annotations

import json

import pytest

from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.core.verdict import Category
from pytest_mnn_parity.engine.explain import failure_message
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.isolation.protocol import result_from_wire, result_to_wire
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.mnn import kept_results
from pytest_mnn_parity.report.records import record

from conftest import FIXTURES

MOBILE = FIXTURES / "depthwise" / "mobile_block.mnn"
DEEP = FIXTURES / "deep" / "deep_fp32.mnn"
REASON = ("raised from fp32: this configuration's depthwise convolution (ConvolutionDepthwise) rounds like fp16, "
          "and the model runs it")


def _simulated_cuda_high() -> mnn_arithmetic.Arithmetic:
    """The CPU's own measurement with the depthwise probe's error replaced by what half-precision weights give
    (0.375 next to 1024), classified by the real classifier: fp32 except depthwise convolutions."""
    measured = mnn_arithmetic.probe_arithmetic("CPU", "high")
    return mnn_arithmetic.classify_arithmetic(measured.errors | {"depthwise": 0.375})


def test_on_this_cpu_a_depthwise_model_keeps_the_fp32_tier():
    engine = ParityEngine()
    for precision in ("high", "low"):
        result = engine.check(MOBILE, RunConfig("CPU", precision))
        assert result.category is Category.OK, result.message
        assert result.arithmetic.kind == "fp32" and result.arithmetic.kernels == {}
        assert (result.tolerance.tier, result.tolerance.tier_reason) == ("fp32", "")


def test_a_depthwise_model_gets_the_tier_of_the_reduced_kernel_and_the_report_says_why(monkeypatch):
    simulated = _simulated_cuda_high()
    assert simulated.kind == "fp32" and simulated.kernels == {"depthwise": "fp16"}
    monkeypatch.setattr(mnn_arithmetic, "probe_arithmetic", lambda backend, precision: simulated)
    engine = ParityEngine()
    mobile = engine.check(MOBILE, RunConfig("CPU", "high"))
    assert mobile.category is Category.OK, mobile.message
    assert (mobile.tolerance.tier, mobile.tolerance.tier_reason) == ("fp16", REASON)
    # The same configuration, a model without a depthwise convolution (ten regular ones): fp32.
    deep = engine.check(DEEP, RunConfig("CPU", "high"))
    assert (deep.tolerance.tier, deep.tolerance.tier_reason) == ("fp32", "")

    lines = failure_message(mobile, engine.model(MOBILE)).splitlines()
    assert "arithmetic: fp32; depthwise convolution rounds like fp16 (probe errors: add " in "\n".join(lines)
    assert any(line.startswith(f"tolerance: tier fp16 ({REASON}): atol 0.02 x ref scale") for line in lines), lines
    rec = json.loads(json.dumps(record("n", mobile, "passed")))
    assert rec["arithmetic"]["kind"] == "fp32" and rec["arithmetic"]["kernels"] == {"depthwise": "fp16"}
    assert rec["arithmetic"]["probe_errors"]["depthwise"] == 0.375
    assert (rec["tolerance"]["tier"], rec["tolerance"]["tier_reason"]) == ("fp16", REASON)

    # Explicit tolerances still win, field by field, over the raised tier.
    strict = engine.check(MOBILE, RunConfig("CPU", "high"), [("command line", {"atol": 1e-4})])
    assert (strict.tolerance.tier, strict.tolerance.atol, strict.tolerance.rtol) == ("fp16", 1e-4, 0.02)
    assert strict.tolerance.sources == ("command line",) and strict.tolerance.tier_reason == REASON


def test_the_finding_crosses_the_worker_protocol_and_a_real_worker_judges_by_it(monkeypatch, tmp_path):
    """The parent hands the arithmetic it knows to a fresh worker (which then probes nothing); the worker's
    verdict, tier and reason come back through the JSON line as they were."""
    simulated = _simulated_cuda_high()
    monkeypatch.setattr(mnn_arithmetic, "probe_arithmetic", lambda backend, precision: simulated)
    local = ParityEngine().check(MOBILE, RunConfig("CPU", "high"))
    back = result_from_wire(json.loads(json.dumps(result_to_wire(local))))
    assert back.arithmetic == simulated and back.tolerance == local.tolerance

    monkeypatch.setattr(mnn_arithmetic, "known_arithmetic", lambda: {("CPU", "high"): simulated})
    log = tmp_path / "probes.log"
    monkeypatch.setenv("MNN_PARITY_PROBE_LOG", str(log))
    engine = IsolatedEngine(ParitySettings(), prespawn=False)
    try:
        isolated = engine.check(MOBILE, RunConfig("CPU", "high"))
    finally:
        engine.close()
    assert isolated.worker is not None, "ran in this process, not in a worker"
    worker_probes = log.read_text().splitlines() if log.exists() else []
    assert not [line for line in worker_probes if "arithmetic" in line], worker_probes
    assert isolated.arithmetic == simulated
    assert (isolated.tolerance.tier, isolated.tolerance.tier_reason) == ("fp16", REASON)
    assert record("n", isolated, "x")["tolerance"] == record("n", local, "x")["tolerance"]


@pytest.mark.parametrize("cached", [1, 2])
def test_kept_results_of_an_older_format_are_probed_again(cached, monkeypatch):
    """Kept arithmetic without kernel probes (format 1) must not stand for a measurement that has them: the key
    holds the format, so an older run's cache is never read back."""
    key = kept_results.discovery_key()
    assert key["format"] == str(kept_results.DISCOVERY_FORMAT) == "2"
    monkeypatch.setattr(kept_results, "DISCOVERY_FORMAT", cached)
    assert (kept_results.discovery_key() == key) == (cached == 2)
