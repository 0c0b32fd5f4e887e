"""fp16 weight-risk scan: the FlatBuffers reader against the real fixtures, and its robustness."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pytest_mnn_parity.onnx.convert import convert_onnx
from pytest_mnn_parity.mnn.weights import (FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, WeightRisk,
                                       _Reader, classify_fp16, fp16_weight_risks, iter_weights)

from conftest import COLLAPSE, DEMO, FIXTURES

PAIRS = ["zero", "partial_zero", "constant", "non_finite", "stale", "mismatch", "healthy"]
FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _weights(path) -> dict[tuple[str, str], np.ndarray | None]:
    return {(t.op_name, t.role): t.values for t in iter_weights(path)}


def _stored_half(path) -> dict[str, np.ndarray]:
    """What a --fp16 build really stores, decoded independently of weights.py's scan logic:
    Convolution2D.quanParameter.buffer (IDSTQuan type 3) and Blob.uint8s (DT_HALF)."""
    r = _Reader(Path(path).read_bytes(), str(path))
    out = {}
    for op in r.tables(r.deref(0), 3):
        name, op_type, main = r.string(op, 3), r.scalar(op, 5, "<i", 0), r.table(op, 2)
        if op_type == 12:
            quan = r.table(main, 3)
            assert r.scalar(quan, 2, "<i", 0) == 3  # IDSTQuan type 3 = fp16
            out[name] = r.array(quan, 0, "u1").view("<f2")
        elif op_type == 11:
            assert r.scalar(main, 2, "<i", 1) == 19  # DT_HALF
            out[name] = r.array(main, 3, "u1").view("<f2")
    return out


# --------------------------------------------------------------------------- real fixtures


def test_zero_tiny_conv_is_read_exactly_and_flushes_entirely():
    rng = np.random.default_rng(2001)  # fixtures/build_fixtures.py: collapse_zero
    expected = (rng.standard_normal((4, 3, 3, 3)) * 1e-8).astype(np.float32).ravel()
    w = _weights(COLLAPSE / "zero.mnn")
    np.testing.assert_array_equal(w["tiny_conv", "weight"], expected)
    np.testing.assert_array_equal(w["tiny_conv", "bias"], np.zeros(4, np.float32))  # MNN adds it
    np.testing.assert_array_equal(w["gain", "const"], [1e7])

    flush, subnormal, overflow = fp16_weight_risks(COLLAPSE / "zero.mnn")
    assert flush == WeightRisk("tiny_conv", "Convolution", "weight", 108, 108, "flush",
                               float(np.abs(expected).min()))
    assert (subnormal.kind, subnormal.count) == ("subnormal", 108)
    assert overflow == WeightRisk("gain", "Const", "const", 1, 1, "overflow", 1e7)


def test_stale_bias_map_const_is_read_exactly():
    rng = np.random.default_rng(2005)
    rng.standard_normal((4, 3, 3, 3))
    expected = rng.random((1, 4, 8, 8)).astype(np.float32).ravel()
    np.testing.assert_array_equal(_weights(COLLAPSE / "stale.mnn")["bias_map", "const"], expected)
    assert [r.op_name for r in fp16_weight_risks(COLLAPSE / "stale.mnn")] == ["tiny_conv", "tiny_conv", "gain"]


def test_healthy_has_weights_but_no_risk():
    tensors = list(iter_weights(COLLAPSE / "healthy.mnn"))
    assert [(t.op_name, t.role, t.values.size) for t in tensors] == [
        ("c1_conv", "weight", 216), ("c1_conv", "bias", 8), ("c2_conv", "weight", 576),
        ("c2_conv", "bias", 8), ("out", "weight", 32), ("out", "bias", 4)]
    assert not any(t.compressed or t.values.flags.writeable for t in tensors)
    assert fp16_weight_risks(COLLAPSE / "healthy.mnn") == []


@pytest.mark.parametrize("name", PAIRS)
def test_fp16_builds_report_compressed_weights_and_float_biases(name):
    fp32 = list(iter_weights(COLLAPSE / f"{name}.mnn"))
    fp16 = list(iter_weights(COLLAPSE / f"{name}.fp16.mnn"))
    assert [(t.op_name, t.role) for t in fp16] == [(t.op_name, t.role) for t in fp32]
    for t in fp16:
        # --fp16 halves conv weights and Consts but keeps conv biases float32.
        assert t.compressed == (t.role != "bias") and (t.values is None) == t.compressed
    assert fp16_weight_risks(COLLAPSE / f"{name}.fp16.mnn") == []


@pytest.mark.parametrize("name", PAIRS)
def test_predicted_flush_and_clamp_match_what_the_converter_did(name):
    half = _stored_half(COLLAPSE / f"{name}.fp16.mnn")
    for t in iter_weights(COLLAPSE / f"{name}.mnn"):
        if t.role == "bias":
            continue
        stored = half[t.op_name].astype(np.float32)
        a = np.abs(t.values)
        np.testing.assert_array_equal((stored == 0) & (a > 0), (a > 0) & (a < FP16_MIN_SUBNORMAL))
        np.testing.assert_array_equal(np.abs(stored) == FP16_MAX, a >= FP16_MAX)
        assert np.all(np.abs(stored) <= a)  # truncation toward zero, never rounded up
        risks = {r.kind: r.count for r in classify_fp16(t.op_name, t.op_type, t.role, t.values)}
        assert risks.get("flush", 0) == int(np.sum((stored == 0) & (a > 0)))


def test_dft_rounding_noise_flushes_but_min_fraction_filters_it():
    risks = fp16_weight_risks(DEMO)
    assert {r.op_name for r in risks} == {f"ffc_{p}_{q}__matmul_converted"
                                          for p in ("dft", "idft") for q in ("real", "imag")}
    assert all(r.kind == "flush" and r.total == 1024 and r.count in (128, 129) and r.worst < 1e-16
               for r in risks)
    assert fp16_weight_risks(DEMO, min_fraction=0.2) == []
    with pytest.raises(ValueError, match="min_fraction"):
        fp16_weight_risks(DEMO, min_fraction=1.5)


def test_subgraph_consts_are_read():
    consts = {k: v.tolist() for k, v in _weights(FIXTURES / "control_flow" / "if_branch.mnn").items()}
    # "zero" is in the main graph; "two" and "one" live in the If's then/else subgraphs.
    assert consts == {("zero", "const"): [0.0], ("two", "const"): [2.0], ("one", "const"): [1.0]}


@pytest.mark.parametrize("name, fp16", [("stale", False), ("healthy", True)])
def test_external_weight_file(tmp_path, name, fp16):
    target = tmp_path / f"{name}.mnn"
    convert_onnx(FIXTURES / "onnx" / f"collapse_{name}.onnx", target, fp16=fp16,
                 extra_flags=["--saveExternalData"])
    weight_file = tmp_path / f"{name}.mnn.weight"
    if not weight_file.exists():  # convert_onnx writes via "<target>.partial" and renames only the .mnn
        os.replace(tmp_path / f"{name}.mnn.partial.weight", weight_file)
    assert weight_file.stat().st_size > 0
    inline = list(iter_weights(COLLAPSE / f"{name}{'.fp16' if fp16 else ''}.mnn"))
    external = list(iter_weights(target))
    assert [(t.op_name, t.role, t.compressed) for t in external] == \
        [(t.op_name, t.role, t.compressed) for t in inline]
    for ext, ref in zip(external, inline):  # fp16: biases sit after the half buffer and scales
        np.testing.assert_array_equal(ext.values, ref.values)
    assert fp16_weight_risks(target) == fp16_weight_risks(COLLAPSE / f"{name}.mnn") * (not fp16)
    weight_file.unlink()
    with pytest.raises(ValueError, match=rf"{name}\.mnn\.weight.*missing"):
        fp16_weight_risks(target)


# --------------------------------------------------------------------------- classifier property


def _expected(values: np.ndarray, min_fraction: float) -> list[tuple[str, int, float]]:
    a = np.abs(values.astype(np.float32))
    out = []
    for kind, mask in (("flush", (a > 0) & (a < 2.0 ** -24)),
                       ("subnormal", (a > 0) & (a < 2.0 ** -14)),
                       ("overflow", a > 65504.0)):
        if kind == "subnormal" and not mask.sum() > 0.5 * np.count_nonzero(a > 0):
            continue
        if mask.any() and mask.mean() >= min_fraction:
            out.append((kind, int(mask.sum()), float(a[mask].max() if kind == "overflow" else a[mask].min())))
    return out


_EDGES = [2.0 ** -24, 2.0 ** -14, 65504.0]
BOUNDARIES = [float(f(np.float32(e), t)) for e in _EDGES for f, t in
              ((np.nextafter, np.float32(0)), (np.nextafter, np.float32(np.inf)), (lambda x, _: x, None))]


@given(hnp.arrays(np.float32, st.integers(1, 32), elements=st.one_of(
           st.floats(width=32), st.floats(-2.0 ** -10, 2.0 ** -10, width=32),
           st.sampled_from(BOUNDARIES + [-b for b in BOUNDARIES]))),
       st.sampled_from([0.0, 0.1, 0.5, 1.0]))
@settings(max_examples=40, deadline=None, database=None)
def test_classifier_agrees_with_numpy(values, min_fraction):
    got = classify_fp16("op", "Convolution", "weight", values, min_fraction)
    assert [(r.kind, r.count, r.worst) for r in got] == _expected(values, min_fraction)
    assert all(r.total == values.size for r in got)


def test_classifier_boundaries():
    below = [float(np.nextafter(np.float32(e), np.float32(0))) for e in (2.0 ** -24, 2.0 ** -14)]
    above = float(np.nextafter(np.float32(FP16_MAX), np.float32(np.inf)))
    values = np.array([0.0, 2.0 ** -24, below[0], 2.0 ** -14, below[1], 1e-6, FP16_MAX, above, np.nan], np.float32)
    got = {r.kind: (r.count, r.worst) for r in classify_fp16("op", "Const", "const", values)}
    assert got == {"flush": (1, below[0]), "subnormal": (4, below[0]), "overflow": (1, above)}  # 4 of 7


def test_thresholds_are_fp16_limits():
    assert np.float16(FP16_MAX) == np.finfo(np.float16).max
    assert FP16_MIN_NORMAL == np.finfo(np.float16).smallest_normal
    assert FP16_MIN_SUBNORMAL == np.finfo(np.float16).smallest_subnormal


# --------------------------------------------------------------------------- malformed files

REAL = [COLLAPSE / "zero.mnn", COLLAPSE / "stale.fp16.mnn", FIXTURES / "control_flow" / "if_branch.mnn"]
REAL_BYTES = {p: p.read_bytes() for p in REAL}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights") / "model.mnn"


def _scan(path: Path, data: bytes) -> None:
    """Parse ``data``: fine or ValueError naming the file; anything else fails the test."""
    path.write_bytes(data)
    try:
        fp16_weight_risks(path)
    except ValueError as exc:
        assert path.name in str(exc)


@pytest.mark.parametrize("data", [b"", b"\x00" * 4, b"\x00" * 64, b"\xff" * 64, b"MNN" * 100])
def test_garbage_raises_value_error(scratch, data):
    scratch.write_bytes(data)
    with pytest.raises(ValueError, match="model.mnn"):
        fp16_weight_risks(scratch)


@pytest.mark.parametrize("source", REAL, ids=lambda p: p.name)
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.75, 0.95])
def test_truncated_real_file_raises_value_error(scratch, source, fraction):
    data = source.read_bytes()
    scratch.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ValueError, match="not a valid .mnn file"):
        list(iter_weights(scratch))


@given(source=st.sampled_from(REAL), cut=st.integers(0, 10**6))
@FUZZ
def test_any_truncation_before_the_padding_raises(scratch, source, cut):
    data = REAL_BYTES[source]
    scratch.write_bytes(data[:cut % (len(data) - 3)])  # the last 3 bytes are string terminator/padding
    with pytest.raises(ValueError):
        list(iter_weights(scratch))


@given(data=st.binary(max_size=512))
@FUZZ
def test_random_bytes_never_crash(scratch, data):
    _scan(scratch, data)


@given(source=st.sampled_from(REAL), flips=st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
@FUZZ
def test_bit_flips_never_crash(scratch, source, flips):
    data = bytearray(REAL_BYTES[source])
    for bit in flips:
        bit %= len(data) * 8
        data[bit // 8] ^= 1 << (bit % 8)
    _scan(scratch, bytes(data))


@given(source=st.sampled_from(REAL), at=st.integers(0, 10**6),
       word=st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF, 12345678]))
@FUZZ
def test_overwritten_offsets_never_crash(scratch, source, at, word):
    data = bytearray(REAL_BYTES[source])
    at = at % (len(data) - 3) & ~3  # flatbuffers offsets are 4-byte aligned words
    data[at:at + 4] = word.to_bytes(4, "little")
    _scan(scratch, bytes(data))
