"""The quick first pass of the per-layer trace gives the verdicts of the full comparison, on real models.

``trace_target(fast=True)`` proves most passing tensors with one float32 pass
(``quickcompare``) and skips copying inputs that are earlier outputs; every
result the user sees must be what ``fast=False`` (full metrics everywhere,
every tensor copied) gives.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pytest_mnn_parity import ParityEngine, RunConfig
from pytest_mnn_parity.core.quickcompare import quick_pass, ref_stats
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel
from pytest_mnn_parity.core.tolerances import TIERS, resolve
from pytest_mnn_parity.trace.record import record_reference
from pytest_mnn_parity.trace import compare as trace_compare
from pytest_mnn_parity.trace.compare import layer_table, trace_target
from pytest_mnn_parity.trace.stream import HELD, ComparisonStream, default_stream

from conftest import COLLAPSE, DEMO, FIXTURES

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)

# (target model, reference model): fp16 collapses blamed on one layer, a healthy
# graph with DFT convolutions, a deep conv stack, an activation beyond fp16, an LSTM.
PAIRS = [(COLLAPSE / f"{name}.fp16.mnn", COLLAPSE / f"{name}.mnn")
         for name in ("zero", "partial_zero", "non_finite", "constant", "stale", "mismatch")]
PAIRS += [(DEMO, DEMO), (FIXTURES / "deep" / "deep_fp32.mnn",) * 2,
          (FIXTURES / "risk" / "overflow_activation.mnn",) * 2, (FIXTURES / "control_flow" / "lstm_origin.mnn",) * 2]
CONFIGS = [RunConfig("CPU", p) for p in ("normal", "high", "low", "Low_BF16")]


_OPENED = []


@functools.lru_cache(maxsize=None)
def _setup(pair: int):
    target_path, ref_path = PAIRS[pair]
    target = LoadedModel(target_path)
    reference = target if ref_path == target_path else LoadedModel(ref_path)
    inputs = ParityEngine().inputs(target)[0]
    trace, _ = record_reference(reference, REFERENCE, inputs)
    _OPENED.append(trace)
    return target, trace, inputs


@pytest.fixture(scope="module", autouse=True)
def _close_traces():
    yield
    _setup.cache_clear()
    while _OPENED:
        _OPENED.pop().close()


def _same_results(fast, full) -> None:
    names = [[(layer.name, layer.type, layer.occurrence) for layer in t.layers] for t in (fast, full)]
    assert names[0] == names[1]
    assert [l.failed for l in fast.layers] == [l.failed for l in full.layers]
    assert [l.inputs_ok for l in fast.layers] == [l.inputs_ok for l in full.layers]
    assert [l.health for l in fast.layers] == [l.health for l in full.layers]
    assert [i.failed for l in fast.layers for i in l.inputs] == [i.failed for l in full.layers for i in l.inputs]
    assert fast.summary() == full.summary()
    assert (fast.first_divergent and fast.first_divergent.name) == (full.first_divergent and full.first_divergent.name)
    assert layer_table(fast) == layer_table(full)  # the rows shown, their metrics and marks
    for a, b in zip(fast.layers, full.layers):
        for x, y in zip(a.outputs, b.outputs):
            assert x.note == y.note
            if x.metrics is not None:  # fully compared in the fast path too: the very same numbers
                assert x.metrics == y.metrics or _nan_equal(x.metrics, y.metrics)
            elif x.quick is not None:  # proven to pass: exact max_abs, a true lower bound on the cosine
                assert not y.failed and y.metrics.outside_fraction == 0.0
                assert x.quick.max_abs == y.metrics.max_abs and x.quick.ref_scale == y.metrics.ref_scale
                assert y.metrics.cosine >= x.quick.cosine_min
            else:
                assert y.metrics is None


def _nan_equal(a, b) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.integers(0, len(PAIRS) - 1), config=st.sampled_from(CONFIGS),
       tier=st.sampled_from(sorted(TIERS)), atol_scale=st.sampled_from([1.0, 1e-2, 1e-4, 1e-6]),
       min_cosine=st.sampled_from([None, 0.999999, 0.9999999]))
def test_fast_trace_gives_the_full_comparisons_results(pair, config, tier, atol_scale, min_cosine):
    """Over fixture x configuration x tolerance (tight ones put layers right at the boundary); the fast trace
    judged in the callback, streamed to the comparison thread one at a time or all at once."""
    target, trace, inputs = _setup(pair)
    tol = TIERS[tier]
    tol = dataclasses.replace(tol, atol=tol.atol * atol_scale, min_cosine=min_cosine or tol.min_cosine)
    full = trace_target(trace, target, config, inputs, tol, fast=False, stream=ComparisonStream(0))
    for stream in (ComparisonStream(0), ComparisonStream(1), ComparisonStream(None)):
        _same_results(trace_target(trace, target, config, inputs, tol, stream=stream), full)


def test_fast_path_is_taken_and_failures_are_still_found():
    """Not vacuous: healthy layers go through the quick pass, the collapsed one is fully compared and blamed."""
    target, trace, inputs = _setup(0)
    tol = resolve("CPU", "high")
    fast = trace_target(trace, target, RunConfig("CPU", "high"), inputs, tol)
    assert fast.first_divergent.name == "tiny_conv" and fast.first_divergent.outputs[0].metrics is not None
    demo, demo_trace, demo_inputs = _setup(PAIRS.index((DEMO, DEMO)))
    passing = trace_target(demo_trace, demo, RunConfig("CPU", "low"), demo_inputs, resolve("CPU", "low"))
    quick = [o for layer in passing.layers for o in layer.outputs if o.quick is not None]
    assert len(quick) >= 0.8 * len(passing.layers) and not any(layer.failed for layer in passing.layers)


@given(st.integers(1, 3000), st.floats(1e-9, 1e3), st.floats(0, 1e-2), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_quick_pass_never_accepts_what_compare_fails(size, scale, noise, seed):
    """The proof behind the quick pass, on random tensors: accepted implies compare passes, max_abs exact."""
    from pytest_mnn_parity.core.metrics import compare
    from pytest_mnn_parity.core.verdict import fails_tolerance

    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(size) * scale).astype(np.float32)
    target = (ref + rng.standard_normal(size).astype(np.float32) * np.float32(noise * scale)).astype(np.float32)
    tol = TIERS["fp32"]
    quick = quick_pass(target, ref, ref_stats(ref), tol)
    m = compare(target, ref, atol=tol.atol, rtol=tol.rtol)
    if quick is not None:
        assert not fails_tolerance(m, tol) and m.outside_fraction == 0.0
        assert quick.max_abs == m.max_abs and m.cosine >= quick.cosine_min
    if noise == 0:
        assert quick is not None  # identical tensors always take the quick path


@pytest.mark.parametrize("pair", [PAIRS.index((DEMO, DEMO)), len(PAIRS) - 1])
def test_recorded_tensors_read_back_as_numpy_reads_them(pair):
    """The trace maps its files without parsing their headers again: same shape, dtype, bytes, still read-only."""
    _, trace, _ = _setup(pair)
    assert trace.files
    for key, kind, index in trace.files:
        fast = trace.load(key, kind, index)
        slow = np.load(trace.files[(key, kind, index)], mmap_mode="r")
        assert fast.shape == slow.shape and fast.dtype == slow.dtype
        assert np.array_equal(fast, slow, equal_nan=fast.dtype.kind == "f") and not fast.flags.writeable


@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1e-7, 1e-5, 1e-3]), st.integers(-1, 5),
       st.sampled_from([None, np.nan, np.inf, 1.0]), st.sampled_from([2, 3, 4]))
@settings(max_examples=25, deadline=None)
def test_quick_pass_in_threads_answers_as_in_one(seed, noise, spike_at, spike, workers):
    """The spans of a large tensor read by threads give the very same answer, max_abs bit for bit, whether a
    difference beyond the bound (or a NaN/Inf) sits in the first span, the last or none."""
    from pytest_mnn_parity.core.metrics import CHUNK

    rng = np.random.default_rng(seed)
    size = 2 * workers * CHUNK + int(rng.integers(0, CHUNK))
    ref = rng.standard_normal(size).astype(np.float32)
    target = ref + (rng.standard_normal(size) * noise).astype(np.float32)
    if spike is not None and spike_at >= 0:
        target[min(size - 1, spike_at * size // 5)] += np.float32(spike)
    tol = TIERS["fp32"]
    stats = ref_stats(ref)
    assert quick_pass(target, ref, stats, tol, workers=workers) == quick_pass(target, ref, stats, tol, workers=1)


def _everything(result) -> str:
    """Every number, note, flag and row of a trace, NaN included (json writes it as NaN on both sides)."""
    return json.dumps([[layer.as_dict() for layer in result.layers], result.summary(), layer_table(result)])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.integers(0, len(PAIRS) - 1), config=st.sampled_from(CONFIGS), fast=st.booleans(),
       jobs=st.sampled_from([1, 2, None]), bytes_bound=st.sampled_from([None, 0.5, 1.0, HELD]),
       seed=st.integers(0, 2**16), workers=st.sampled_from([None, 1, 3]))
def test_streamed_trace_does_not_depend_on_thread_timing(pair, config, fast, jobs, bytes_bound, seed, workers):
    """The comparison thread, slowed at random before each judgement, under a queue of one, two or no bound and a
    bytes bound below one tensor up to the default: the very result of judging inside the callback, and the
    bound on what is held is kept (a tensor alone is always allowed)."""
    target, trace, inputs = _setup(pair)
    tol = resolve("CPU", config.precision)
    inline = trace_target(trace, target, config, inputs, tol, fast=fast, stream=ComparisonStream(0))
    largest = trace.largest_tensor_bytes()
    bound = None if bytes_bound is None else int(bytes_bound * largest)
    stream = ComparisonStream(jobs, bound, quick_workers=workers)
    delays = random.Random(seed)
    original = trace_compare.TargetComparer._compare

    def slowed(*args, **kwargs):
        time.sleep(delays.choice([0, 0, 1e-4, 1e-3, 3e-3]))
        return original(*args, **kwargs)

    with mock.patch.object(trace_compare.TargetComparer, "_compare", slowed):
        streamed = trace_target(trace, target, config, inputs, tol, fast=fast, stream=stream)
    assert _everything(streamed) == _everything(inline)
    assert stream.peak_held <= max(bound if bound is not None else stream.peak_held, 2 * largest)
    assert stream.pending == 0 and stream.held == stream.kept  # every reference let go, only copies kept
    if jobs is not None:
        assert stream.peak_jobs <= jobs


def test_streaming_overlaps_when_asked_and_the_default_judges_in_the_callback():
    """Not vacuous: with the comparisons slowed, an unbounded stream holds several at once; the default judges
    inside the callback on any machine (streaming measured slower on 2 and on 16 cores), within the bound."""
    target, trace, inputs = _setup(PAIRS.index((DEMO, DEMO)))
    stream = ComparisonStream(None)
    original = trace_compare.TargetComparer._compare

    def slowed(*args, **kwargs):
        time.sleep(2e-3)
        return original(*args, **kwargs)

    with mock.patch.object(trace_compare.TargetComparer, "_compare", slowed):
        trace_target(trace, target, RunConfig("CPU", "high"), inputs, resolve("CPU", "high"), stream=stream)
    assert stream.peak_jobs > 1
    for cores in (2, 16, 64):
        with mock.patch("pytest_mnn_parity.core.quickcompare.usable_cores", return_value=cores):
            chosen = default_stream(1000)
        assert chosen.max_jobs == 0 and chosen.max_bytes == int(HELD * 1000) and chosen.quick_workers is None


def test_an_error_in_the_comparison_thread_is_raised_by_the_trace():
    """A comparison that raises in the thread fails the trace as one raised in the callback did, and leaves
    nothing running."""
    target, trace, inputs = _setup(PAIRS.index((DEMO, DEMO)))
    calls = []
    original = trace_compare.TargetComparer._compare

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("third comparison")
        return original(*args, **kwargs)

    stream = ComparisonStream(None)
    with mock.patch.object(trace_compare.TargetComparer, "_compare", failing), \
            pytest.raises(MemoryError, match="third comparison"):
        trace_target(trace, target, RunConfig("CPU", "high"), inputs, resolve("CPU", "high"), stream=stream)
    assert stream.pending == 0 and len(calls) > 3


@given(st.integers(1, 1 << 16), st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_an_earlier_output_is_known_by_its_address_until_its_bytes_change(size, seed):
    """The byte sample behind input reuse (read without letting go of the GIL, for the comparison thread's sake)
    still tells an unchanged tensor from one written since: the first byte is always sampled."""
    from pytest_mnn_parity.trace.tensor_ids import Producers, TensorInfo

    buffer = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    info = TensorInfo((size,), np.dtype(np.uint8), buffer.ctypes.data)
    producers = Producers()
    producers.wrote(info, "op#0 out 0")
    assert producers.find(info) == "op#0 out 0"
    buffer[0] ^= 0xFF
    assert producers.find(info) is None
