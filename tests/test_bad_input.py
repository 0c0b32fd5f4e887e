"""Bad input, tried for real: corrupt and hostile model files, huge shapes, NaN inputs, malformed ini values.

Each case must give a specific error naming the file and the cause, the other
models must still be tested, and the report must still be written.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import random
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.report.records import record
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.core.verdict import Category

from conftest import COLLAPSE, DEMO, FIXTURES, plugin_env, read_report

HEALTHY = COLLAPSE / "healthy.mnn"
MULTI_IO = FIXTURES / "multi_io.mnn"
HIGH = RunConfig("CPU", "high")
# Single bit flips of collapse/healthy.mnn that make MNN 3.6.1 segfault in createSession
# (found by the fuzzing below); on another MNN they may load or be refused instead.
KNOWN_CRASHERS = {"flip_350_4.mnn": (350, 4), "flip_3192_5.mnn": (3192, 5)}


def _flip(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def _drop_file_permission_override() -> None:
    """Run as root, a child would read a mode-000 file anyway: drop the capabilities that allow it."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set before exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _corpus(folder) -> dict[str, str]:
    """file name -> what its error must say (None: any verdict, but a message naming the file if it fails)."""
    healthy = HEALTHY.read_bytes()
    expect: dict[str, str | None] = {}

    def put(name: str, data: bytes, says: str | None) -> None:
        (folder / name).write_bytes(data)
        expect[name] = says

    put("empty.mnn", b"", "is empty (0 bytes)")
    for offset in (1, 8, 64, 512, len(healthy) // 2, len(healthy) - 16):
        put(f"truncated_{offset}.mnn", healthy[:offset], "MNN cannot load it")
    # The last byte is flatbuffer padding: without it the model still loads, and may rightly pass.
    put(f"truncated_{len(healthy) - 1}.mnn", healthy[:-1], None)
    put("random.mnn", random.Random(0).randbytes(4096), "flatbuffer verification failed")
    put("zeros.mnn", bytes(1024), "MNN cannot load it")
    put("onnx_renamed.mnn", (FIXTURES / "onnx" / "multi_io.onnx").read_bytes(), "flatbuffer verification failed")
    for name, (offset, bit) in KNOWN_CRASHERS.items():
        put(name, _flip(healthy, offset, bit), None)
    rng = random.Random(8)
    for _ in range(6):
        offset, bit = rng.randrange(len(healthy)), rng.randrange(8)
        put(f"flip_{offset}_{bit}.mnn", _flip(healthy, offset, bit), None)
    (folder / "folder.mnn").mkdir()
    (folder / "folder.mnn" / "inside.txt").write_text("a directory named like a model")
    expect["folder.mnn"] = "is a directory, not an MNN model file"
    put("unreadable.mnn", healthy, "is not readable (permission denied)")
    os.chmod(folder / "unreadable.mnn", 0)
    put("huge_input.mnn", (FIXTURES / "limits" / "huge_input.mnn").read_bytes(),
        "its inputs need 4.5 GiB per input set (image 1x3x20000x20000 float32 = 4.5 GiB), above the limit of "
        "1024 MiB (--mnn-max-input-mb)")
    return expect


def test_a_corpus_of_bad_model_files_fails_each_file_by_name_and_the_good_models_still_pass(tmp_path):
    expect = _corpus(tmp_path)
    (tmp_path / "good_a.mnn").write_bytes(MULTI_IO.read_bytes())
    (tmp_path / "good_b.mnn").write_bytes(DEMO.read_bytes())
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--mnn-only", "--mnn-backends", "CPU",
            "--mnn-precisions", "high", "--mnn-isolate", "--mnn-timeout", "60", "--mnn-report", "r.json", "-q"]
    for name in ["good_a.mnn", *expect, "good_b.mnn"]:
        args += ["--mnn-model", name]
    proc = subprocess.run(args, cwd=tmp_path, env=plugin_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_drop_file_permission_override)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out[-4000:]
    report = read_report(tmp_path / "r.json")
    by_model = {r["model"]: r for r in report["results"]}
    assert set(by_model) == {"good_a.mnn", "good_b.mnn", *expect}
    for good in ("good_a.mnn", "good_b.mnn"):
        assert (by_model[good]["outcome"], by_model[good]["category"]) == ("passed", "ok"), by_model[good]["message"]
    for name, says in expect.items():
        rec = by_model[name]
        if says is not None:
            assert rec["category"] == "model_error" and rec["outcome"] == "error", (name, rec["message"])
            assert rec["message"].startswith(f"{tmp_path / name}: ") or rec["message"].startswith(f"{name}: ")
            assert says in rec["message"], (name, rec["message"])
            assert "fix: " in rec["message"]
        elif rec["category"] != "ok":
            assert name in rec["message"], (name, rec["message"])
    for name in KNOWN_CRASHERS:  # crashed on MNN 3.6.1; never allowed to pass silently as ok
        assert by_model[name]["category"] in ("crashed", "model_error", "runtime_error"), by_model[name]
    if any(by_model[n]["category"] == "crashed" for n in KNOWN_CRASHERS):
        crashed = next(by_model[n] for n in KNOWN_CRASHERS if by_model[n]["category"] == "crashed")
        assert crashed["fault"]["signal"] in ("SIGSEGV", "SIGFPE", "SIGBUS", "SIGABRT", "SIGILL")


def test_names_that_are_not_utf8_are_handled(tmp_path):
    """Found by fuzzing: pymnn decodes tensor and op names as UTF-8 and raised on corrupt ones."""
    healthy = HEALTHY.read_bytes()
    bad_input = tmp_path / "bad_input_name.mnn"
    bad_input.write_bytes(healthy.replace(b"image", b"\xffmage"))
    result = ParityEngine().check(bad_input, HIGH)
    assert result.category is Category.MODEL_ERROR
    assert result.message.startswith(f"{bad_input}: an input or output name is not valid UTF-8")
    bad_op = tmp_path / "bad_op_name.mnn"
    bad_op.write_bytes(healthy.replace(b"c2_conv", b"\xff2_conv"))
    traced = ParityEngine(ParitySettings(layers="always")).check(bad_op, HIGH)
    assert traced.category is Category.OK, traced.message
    assert "<op name not valid UTF-8>" in [layer.name for layer in traced.trace.layers]


def test_metrics_of_extreme_values_do_not_raise():
    """Found by fuzzing: a corrupt weight made a layer's error energy overflow, and log10(0) raised."""
    from pytest_mnn_parity.core.metrics import compare

    with np.errstate(all="ignore"):
        m = compare(np.array([1e200, 1.0]), np.array([1e-170, 1.0]), atol=1e-3, rtol=1e-3)
    assert m.snr_db == -200.0 and m.outside_fraction == 0.5
    big = np.full(8, 3e38, np.float32)  # identical and finite, but their squares overflow float32
    assert compare(big, big.copy(), atol=5e-4, rtol=1e-3).cosine == 1.0


def test_huge_shapes_are_refused_before_anything_is_allocated():
    engine = ParityEngine(ParitySettings(input_shapes={"image": (1, 3, 100000, 100000)}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = engine.check(FIXTURES / "dynamic" / "dynamic_hw.mnn", HIGH)
    assert time.monotonic() - started < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024  # KiB: nothing big was touched
    assert result.category is Category.MODEL_ERROR
    assert "dynamic_hw.mnn: its inputs need 111.8 GiB per input set (image 1x3x100000x100000 float32" in result.message
    assert "--mnn-input-shape" in result.message and "--mnn-max-input-mb" in result.message
    static = ParityEngine(ParitySettings(max_input_mb=5000)).model(FIXTURES / "limits" / "huge_input.mnn")
    assert static.shapes["image"] == (1, 3, 20000, 20000)  # a larger limit lets it load (inputs not generated)


def test_nan_and_inf_inputs_are_allowed_and_reported():
    engine = ParityEngine()
    model = engine.model(HEALTHY)
    a, b = (dict(s) for s in engine.inputs(model))
    a["image"] = a["image"].copy()
    a["image"][0, 0, 0, :3] = np.nan
    a["image"][0, 1, 4, 4] = np.inf
    engine.provide_inputs(HEALTHY, a, b)
    result = engine.check(HEALTHY, RunConfig("CPU", "low"))
    assert result.inputs_nonfinite == {"image": {"nan": 3, "inf": 1, "size": a["image"].size, "sets": "A"}}
    assert result.input_set.startswith("provided")
    assert record("n", result, "passed")["inputs_nonfinite"]["image"]["nan"] == 3
    # NaN/Inf that follow from the input, on both sides, are not a backend difference.
    assert result.category is Category.OK, result.message
    generated = ParityEngine().check(HEALTHY, RunConfig("CPU", "low"))
    assert generated.inputs_nonfinite is None


def test_nan_inputs_are_named_in_a_failure_message():
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "zero.mnn")))
    model = engine.model(COLLAPSE / "zero.fp16.mnn")
    a, _ = engine.inputs(model)
    a = {"image": np.where(np.arange(a["image"].size).reshape(a["image"].shape) == 5, np.nan, a["image"])}
    engine.provide_inputs(COLLAPSE / "zero.fp16.mnn", a)
    result = engine.check(COLLAPSE / "zero.fp16.mnn", HIGH)
    assert not result.passed
    assert "not finite (allowed; NaN/Inf outputs may follow from it): image: 1 NaN and 0 Inf in input set(s) A" \
        in result.message


def test_provided_inputs_must_match_the_model():
    engine = ParityEngine()
    with pytest.raises(ValueError, match=r"healthy.mnn: input 'image' has shape \(2, 3\), the model needs"):
        engine.provide_inputs(HEALTHY, {"image": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"no array for input\(s\) \['image'\]"):
        engine.provide_inputs(HEALTHY, {})


@pytest.mark.parametrize(("line", "message"), [
    ("mnn_timeout = soon", "mnn_timeout in {ini}: expected a number, got 'soon'"),
    ("mnn_max_input_mb = -5", "mnn_max_input_mb in {ini}: expected a size in MiB > 0, got -5"),
    ("mnn_isolate = sometimes", "mnn_isolate in {ini}: expected one of auto, always, never, got 'sometimes'"),
    ("mnn_atol = loose", "mnn_atol in {ini}: expected a number, got 'loose'"),
    ("mnn_threads = many", "mnn_threads in {ini}: expected a number, got 'many'"),
    ("mnn_backends = CPU,OPENCLL", "mnn_backends in {ini}: unknown MNN backend 'OPENCLL'"),
])
def test_a_malformed_ini_value_is_a_usage_error_naming_the_file_and_key(pytester, models, line, message):
    models("multi_io.mnn")
    ini = pytester.makeini(f"[pytest]\nmnn_model = multi_io.mnn\n{line}\n")
    result = pytester.runpytest("--mnn-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message.format(ini=ini) in result.stderr.str()


_SOURCES = [HEALTHY.read_bytes(), MULTI_IO.read_bytes(), DEMO.read_bytes()]


@st.composite
def corruptions(draw):
    """A real model, damaged the ways files get damaged: cut, bit-rotted, overwritten, spliced."""
    data = bytearray(draw(st.sampled_from(_SOURCES)))
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "zero", "insert", "duplicate"]))
    offset = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return kind, bytes(data[:offset])
    if kind == "flip":
        for off, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                                      min_size=1, max_size=8)):
            data[off] ^= 1 << bit
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=64))
        data[offset:offset + len(chunk)] = chunk
    elif kind == "zero":
        length = draw(st.integers(1, 256))
        data[offset:offset + length] = bytes(len(data[offset:offset + length]))
    elif kind == "insert":
        data[offset:offset] = draw(st.binary(min_size=1, max_size=64))
    else:
        length = draw(st.integers(1, 256))
        data[offset:offset] = data[offset:offset + length]
    return kind, bytes(data)


@pytest.fixture(scope="module")
def fuzz_engine():
    # One worker for every variant (a crash costs a fresh one): cheap enough to try many.
    engine = IsolatedEngine(ParitySettings(), timeout=60, worker_per_model=False)
    yield engine
    engine.close()


_counter = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruption=corruptions())
def test_corrupted_models_never_take_the_run_down(fuzz_engine, tmp_path_factory, corruption):
    kind, data = corruption
    path = tmp_path_factory.getbasetemp() / f"fuzz_{next(_counter)}_{kind}.mnn"
    path.write_bytes(data)
    result = fuzz_engine.check(path, HIGH)
    assert isinstance(result.category, Category)
    if not result.passed:
        assert str(path) in result.message, result.message
    fuzz_engine.release(path)
    control = fuzz_engine.check(MULTI_IO, HIGH)
    assert control.category is Category.OK, control.message
    path.unlink()
