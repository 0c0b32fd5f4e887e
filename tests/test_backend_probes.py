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

from pytest_mnn_parity.mnn import backends, weights
from pytest_mnn_parity.mnn import arithmetic as mnn_arithmetic
from pytest_mnn_parity.mnn.arithmetic import (
    ARITHMETIC_PROBE_INPUT,
    KERNEL_FP32_LIMIT,
    KERNEL_PROBE_INPUT,
    KERNEL_PROBES,
    KERNEL_WEIGHTS,
    Arithmetic,
    classify_arithmetic,
    kernel_probe_errors,
    model_kernels,
    probe_errors,
)
from pytest_mnn_parity.mnn.backends import (
    FORWARD_TYPES,
    PROBE_INPUT,
    judge_probe,
)

from conftest import FIXTURES

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
    measured = mnn_arithmetic.probe_arithmetic("CPU", "high")
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


# -- the kernel probes: a depthwise and a regular convolution, each output one input times one weight ------------

def _kernel_output(activations: str = "fp32", weights_in: str = "fp32", stride: int = 1) -> np.ndarray:
    """What a kernel probe returns when its activations (input and output) and its weights are stored in the
    given formats and its products are exact: "fp16" is numpy's half (also what a 10-bit-mantissa TF32 multiply
    keeps of these values), "bf16" rounds fp32's mantissa to 8 bits; ``stride`` 2 is the regular convolution's."""
    def stored(a, fmt):
        a = np.asarray(a, np.float32)
        if fmt == "fp16":
            return a.astype(np.float16).astype(np.float32)
        return _bf16(a) if fmt == "bf16" else a

    w = stored(KERNEL_WEIGHTS, weights_in)[None, :, None, None]
    x = stored(KERNEL_PROBE_INPUT, activations)[:, :, ::stride, ::stride]
    return stored(x.astype(np.float64) * w.astype(np.float64), activations)


def _errors(**kernels: np.ndarray) -> dict[str, float]:
    """The probes' errors: the elementwise ones of fp32 unless given, each kernel's from its recorded output."""
    base = kernels.pop("base", _recorded("fp32"))
    return probe_errors(base) | kernel_probe_errors(
        {k: kernels.get(k, _kernel_output(stride=mnn_arithmetic.KERNEL_STRIDES[k])) for k in KERNEL_PROBES})


def test_the_kernel_recordings_round_as_the_formats_do():
    """Half-precision weights lose 0.375 of a product next to 1024 (invisible with weight 1, so the probe has
    weights fp16 cannot hold); half-precision activations lose up to 0.45 of 1024.45; bf16 weights 2, bf16
    throughout up to 4."""
    # Exact in fp32: every product here fits fp32's mantissa.
    assert kernel_probe_errors({"depthwise": _kernel_output()})["depthwise"] == 0
    assert 0.3 < kernel_probe_errors({"depthwise": _kernel_output(weights_in="fp16")})["depthwise"] <= 0.5
    assert 0.4 < kernel_probe_errors({"depthwise": _kernel_output(activations="fp16")})["depthwise"] <= 0.5
    assert kernel_probe_errors({"depthwise": _kernel_output(weights_in="bf16")})["depthwise"] == 2  # 1 + 2**-9 is 1 in bf16
    assert 0.5 < kernel_probe_errors({"depthwise": _kernel_output(weights_in="bf16", activations="bf16")})["depthwise"] <= 4
    # The regular convolution reads every other pixel (stride 2): still every way of losing precision.
    assert 0.4 < kernel_probe_errors({"conv": _kernel_output(activations="fp16", stride=2)})["conv"] <= 0.5
    assert 0.3 < kernel_probe_errors({"conv": _kernel_output(weights_in="fp16", stride=2)})["conv"] <= 0.5


@pytest.mark.parametrize(("errors", "kind", "kernels"), [
    # CUDA high on the H200 (issue 20): elementwise and MatMul fp32, depthwise weights kept in half precision.
    (_errors(depthwise=_kernel_output(weights_in="fp16")), "fp32", {"depthwise": "fp16"}),
    # A TF32-like multiply rounds both operands to a 10-bit mantissa: the same finding.
    (_errors(depthwise=_kernel_output(activations="fp16", weights_in="fp16")), "fp32", {"depthwise": "fp16"}),
    (_errors(conv=_kernel_output(weights_in="bf16", stride=2)), "fp32", {"conv": "bf16"}),
    (_errors(depthwise=_kernel_output(activations="fp16"), conv=_kernel_output(weights_in="fp16", stride=2)), "fp32",
     {"depthwise": "fp16", "conv": "fp16"}),
    # Everything in fp16 (Vulkan low): the kernels round as the rest, nothing to single out.
    (_errors(base=_recorded("fp16"), depthwise=_kernel_output("fp16", "fp16"),
             conv=_kernel_output("fp16", "fp16", stride=2)), "fp16", {}),
    # Vulkan normal/low on the H200, as recorded: two fp16 roundings in the kernels (0.95, 0.8) are still fp16.
    ({"add": 0.45, "matmul": 0.45, "depthwise": 0.95, "conv": 0.8}, "fp16", {}),
    # fp16 elementwise with a bf16 kernel: the kernel is still looser than the rest.
    (_errors(base=_recorded("fp16"), conv=_kernel_output("bf16", "bf16", stride=2)), "fp16", {"conv": "bf16"}),
    (_errors(), "fp32", {}),
])
def test_a_kernel_that_rounds_looser_than_the_elementwise_path_is_named_with_its_format(errors, kind, kernels):
    arithmetic = classify_arithmetic(errors)
    assert (arithmetic.kind, arithmetic.kernels) == (kind, kernels), arithmetic.describe()
    assert set(arithmetic.errors) == {"add", "matmul", *KERNEL_PROBES}  # every probe's error stays on record


def test_a_depthwise_probe_off_by_half_at_1024_is_an_fp16_kernel_and_the_message_says_so():
    errors = {"add": 4.88e-05, "matmul": 4.88e-05, "depthwise": 0.5, "conv": 2.4e-4}
    arithmetic = classify_arithmetic(errors)
    assert arithmetic == Arithmetic("fp32", errors, "", {"depthwise": "fp16"})
    assert arithmetic.describe() == ("fp32; depthwise convolution rounds like fp16 (probe errors: add 4.88e-05, "
                                     "matmul 4.88e-05, depthwise 0.5, conv 0.00024)")


@pytest.mark.parametrize("output", [np.full_like(KERNEL_PROBE_INPUT, np.nan), KERNEL_PROBE_INPUT + 100,
                                    np.zeros_like(KERNEL_PROBE_INPUT)])
def test_a_broken_kernel_probe_widens_nothing_and_is_noted(output):
    """A kernel off by more than any float format explains is no format: the items that run it must fail, so it
    raises no tier; the note says what the probe saw."""
    arithmetic = classify_arithmetic(_errors(depthwise=output))
    assert arithmetic.kind == "fp32" and arithmetic.kernels == {}
    assert "the depthwise convolution probe was off by" in arithmetic.note
    assert "more than any float format explains" in arithmetic.note


def test_no_kernel_is_singled_out_where_the_elementwise_path_is_unknown_or_broken():
    """Then the tier comes from the backend x precision table, and a kernel finding has nothing to refine."""
    same = {"add": X.copy(), "matmul": X.copy()}
    unknown = classify_arithmetic(probe_errors(same) | kernel_probe_errors({"depthwise": _kernel_output("fp16")}))
    assert unknown.kind == "unknown" and unknown.kernels == {}


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 0.6, allow_nan=False), st.dictionaries(st.sampled_from(sorted(KERNEL_PROBES)),
                                                            st.floats(0, 6, allow_nan=False)))
def test_a_named_kernel_is_always_looser_than_the_elementwise_format(base_error, kernel_errors):
    base = max(base_error, 1e-5)
    arithmetic = classify_arithmetic({"add": base, "matmul": base} | kernel_errors)
    order = ["fp32", "fp16", "bf16"]
    for name, kind in arithmetic.kernels.items():
        assert order.index(kind) > order.index(arithmetic.kind)
        assert kind == mnn_arithmetic.kernel_format(kernel_errors[name])
    for name, error in kernel_errors.items():
        if name not in arithmetic.kernels:  # left out: as tight as the rest, or no format at all
            fmt = mnn_arithmetic.kernel_format(error)
            assert fmt == "broken" or order.index(fmt) <= order.index(arithmetic.kind)


def test_the_real_cpu_kernel_probes_are_fp32_and_run_the_op_types_converted_models_have():
    """On this CPU every kernel computes fp32 at every precision; the probe model holds the same op types a
    converted model holds (weights stored in the op, not fed as inputs, which MNN runs with other kernels)."""
    assert set(weights.op_types(mnn_arithmetic.kernel_probe_model())) >= {
        op for probe in KERNEL_PROBES.values() for op in probe.op_types}
    for precision in backends.PRECISIONS:
        measured = mnn_arithmetic.probe_arithmetic("CPU", precision)
        assert measured.kind == "fp32" and measured.kernels == {}, measured.describe()
        assert all(0 <= measured.errors[k] <= KERNEL_FP32_LIMIT for k in KERNEL_PROBES), measured.errors
        assert classify_arithmetic(measured.errors) == measured


def test_a_model_is_matched_to_the_reduced_kernels_it_really_runs():
    cuda_high = Arithmetic("fp32", {}, "", {"depthwise": "fp16"})
    mobile = weights.op_types(FIXTURES / "depthwise" / "mobile_block.mnn")
    deep = weights.op_types(FIXTURES / "deep" / "deep_fp32.mnn")
    assert "ConvolutionDepthwise" in mobile and "ConvolutionDepthwise" not in deep
    assert model_kernels(cuda_high, mobile) == {"depthwise convolution (ConvolutionDepthwise)": "fp16"}
    assert model_kernels(cuda_high, deep) == {}
    assert model_kernels(mnn_arithmetic.probe_arithmetic("CPU", "high"), mobile) == {}
    assert model_kernels(None, mobile) == {}


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
