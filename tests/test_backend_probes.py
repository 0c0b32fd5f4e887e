"""The backend probes' verdicts on recorded probe outputs: the arithmetic classifier and the 2x+1 check.

On the registry's CPU wheel every probe computes fp32 and every GPU backend falls back, so the fp16, bf16,
"returns its input" and "wrong answer" outcomes happen only on a GPU machine (docs/gpu.md). The probes'
verdicts are pure functions of what the probe models returned; these tests feed them the outputs each
outcome gives, computed the way that hardware rounds (numpy's float16, bf16 by rounding fp32's mantissa),
so a broken classifier fails here and not only on the lent GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.mnn import backends
from pytest_mnn_parity.mnn.backends import (
    ARITHMETIC_PROBE_INPUT,
    FORWARD_TYPES,
    PROBE_INPUT,
    classify_arithmetic,
    judge_probe,
    probe_errors,
)

X = ARITHMETIC_PROBE_INPUT


def _bf16(a) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even on the 16 dropped bits), back as float32."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _recorded(dtype: str, *, matmul: str | None = None) -> dict[str, np.ndarray]:
    """What the two probe models, ``(x + 1024) - 1024`` and the same through an identity MatMul, return when
    every intermediate is stored in ``dtype`` (``matmul`` overrides it for the MatMul probe)."""
    def through(kind: str) -> np.ndarray:
        if kind == "fp32":
            return (X + np.float32(1024)) - np.float32(1024)
        if kind == "fp16":
            h = X.astype(np.float16)
            return ((h + np.float16(1024)) - np.float16(1024)).astype(np.float32)
        return _bf16(_bf16(_bf16(X) + np.float32(1024)) - np.float32(1024))

    return {"add": through(dtype), "matmul": through(matmul or dtype)}


def test_the_recordings_round_as_the_formats_do():
    """The emulation itself: what survives next to 1024 is fp32's ~1e-4, fp16's 1, bf16's 8."""
    assert 0 < max(probe_errors(_recorded("fp32")).values()) < 1e-3
    assert set(np.unique(_recorded("fp16")["add"])) <= {0.0, 1.0}
    assert set(np.unique(_recorded("bf16")["add"])) <= {0.0, 8.0}


@pytest.mark.parametrize(("recorded", "kind"), [
    (_recorded("fp32"), "fp32"),
    (_recorded("fp16"), "fp16"),
    (_recorded("bf16"), "bf16"),
    # CUDA at normal on the H100: elementwise in fp32, MatMul in fp16 (docs/gpu.md): fp16 decides.
    (_recorded("fp32", matmul="fp16"), "fp16"),
])
def test_each_float_format_is_recognised_from_its_rounding(recorded, kind):
    arithmetic = classify_arithmetic(probe_errors(recorded))
    assert arithmetic.kind == kind, arithmetic.describe()
    assert set(arithmetic.errors) == {"add", "matmul"}


def test_a_probe_that_returns_its_input_unchanged_is_unknown_never_fp32():
    """CUDA at Low_BF16 on the H100 (MNN finding 1): no rounding at all is no arithmetic, and no tier is picked
    from it (a backend that did not compute must not be held to the tightest tier as if it were exact)."""
    arithmetic = classify_arithmetic(probe_errors({"add": X.copy(), "matmul": X.copy()}))
    assert arithmetic.kind == "unknown"
    assert "output equals the input exactly" in arithmetic.note


@pytest.mark.parametrize("output", [
    np.full_like(X, np.nan),                   # NaN out of the probe
    X + np.float32(100),                       # off by more than any float format explains
    np.full_like(X, np.inf),
    np.zeros_like(X) - np.float32(5),
])
def test_a_probe_off_by_more_than_any_float_format_is_broken(output):
    arithmetic = classify_arithmetic(probe_errors({"add": _recorded("fp32")["add"], "matmul": output}))
    assert arithmetic.kind == "broken" and "more than any float format explains" in arithmetic.note


def test_the_real_cpu_probe_agrees_with_the_classifier_on_its_own_errors():
    """The refactor kept the measurement: the CPU's real probe is what the classifier says of its errors."""
    measured = backends.probe_arithmetic("CPU", "high")
    assert measured.kind == classify_arithmetic(measured.errors).kind == "fp32"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 8, allow_nan=False), min_size=1, max_size=3))
def test_the_classification_follows_the_worst_probe_error(errors):
    """Whatever the errors, the kind is the loosest format the worst error needs, the order fixed."""
    kind = classify_arithmetic({f"p{i}": e for i, e in enumerate(errors)}).kind
    worst = max(errors)
    order = ["fp32", "fp16", "bf16", "broken"]
    if worst == 0:
        assert kind == "unknown"
    else:
        assert kind in order
        # A larger worst error never gives a tighter format.
        tighter = classify_arithmetic({"p": worst / 2}).kind
        assert tighter == "unknown" or order.index(tighter) <= order.index(kind)
        assert (kind == "fp32") == (worst <= 1e-3)
        assert (kind == "broken") == (worst > 4.0)


# -- the 2x+1 probe of discovery --------------------------------------------------------------------------

def test_a_backend_that_computes_2x_plus_1_is_available():
    status = judge_probe("CUDA", FORWARD_TYPES["CUDA"], 0, 2 * PROBE_INPUT + 1)
    assert status.available and status.reason == "CUDA: available (forward type 2)"


@pytest.mark.parametrize("y", [
    PROBE_INPUT.copy(),                        # returned its input
    np.zeros_like(PROBE_INPUT),                # a device that wrote nothing
    2 * PROBE_INPUT + 1.5,                     # wrong by more than the probe allows
    np.full_like(PROBE_INPUT, np.nan),
    None,                                      # nothing came back
])
def test_a_backend_that_reports_itself_but_computes_a_wrong_2x_plus_1_is_unavailable_with_what_it_computed(y):
    """CUDA reports forward type 2 even without a usable device (docs/gpu.md): the answer decides."""
    status = judge_probe("CUDA", FORWARD_TYPES["CUDA"], 0, y)
    assert not status.available
    assert status.reason.startswith("CUDA: reports itself but computed ")
    assert "for 2x+1 of" in status.reason and "(unusable device?)" in status.reason
    assert str(y) in status.reason


def test_a_backend_whose_probe_run_fails_is_unavailable_with_the_code():
    status = judge_probe("VULKAN", FORWARD_TYPES["VULKAN"], 3, None)
    assert not status.available and status.reason == "VULKAN: reports itself but its probe run failed (code 3)"


@pytest.mark.parametrize("forward", [0, 13])
def test_a_session_that_fell_back_is_unavailable_whatever_it_computed(forward):
    status = judge_probe("OPENCL", forward, 0, 2 * PROBE_INPUT + 1)
    assert not status.available
    assert status.reason == "OPENCL: not in this MNN build (session fell back to CPU)"


def test_the_real_probe_of_a_missing_backend_is_the_judged_fallback():
    """probe_backend hands what it ran to judge_probe: on the CPU wheel METAL really falls back."""
    real = backends.probe_backend("METAL")
    assert not real.available
    assert real.reason == judge_probe("METAL", real.forward_type, None, None).reason
