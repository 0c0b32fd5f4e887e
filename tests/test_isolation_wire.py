"""Everything an item can ask for crosses to the isolated worker: the same results as in-process, but protected.

Each kind of item that used to run in the pytest process under ``--mnn-isolate``
(named input sets, per-output and per-layer tolerances, the API axis, streams,
pictures, saved bundles) runs twice on real models, ``always`` and ``never``:
the JSON records must match but for timing and the worker, and every isolated
record must name the worker that ran it.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_mnn_parity.isolation import protocol as wire
from pytest_mnn_parity.report.artifacts import ArtifactWriter
from pytest_mnn_parity.engine.bundle import read_entries
from pytest_mnn_parity.isolation.engine import IsolatedEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.inputs.sidecar import find_sidecar
from pytest_mnn_parity.inputs.stream_spec import parse_stream
from pytest_mnn_parity.isolation.protocol import (PickleFiles, from_wire, per_name_from_wire, per_name_to_wire, stream_from_wire,
                                          stream_to_wire)
from pytest_mnn_parity.isolation.worker import FAULT_INJECTION_ENV

from conftest import COLLAPSE, FIXTURES, plugin_env, read_report, results_by_nodeid
from test_reports import parse_html
from test_stream import specs

CPU = ("--mnn-only", "--mnn-backends", "CPU")
SIDECAR = """
[input_sets.photo1]
image = { image = "photo1.png" }
mask = { mask = "mask1.png" }

[input_sets.broken]
image = { image = "nope.png" }
mask = { mask = "mask1.png" }

[tolerance.outputs.inpainted]
atol = 1e-9
rtol = 0.0
abs_floor = 0.0

[tolerance.layers.enc_conv]
atol = 1e-12
rtol = 0.0
"""


def _lama_with_sidecar(pytester, models):
    # ONNX Runtime as the reference: MNN's own CPU items at the reference's thread count are bit-identical to
    # it, so float noise against another implementation is what the 1e-9 tolerance fails on.
    models("inputs/lama_like.mnn", "inputs/photo1.png", "inputs/mask1.png", "onnx/lama_like.onnx")
    (pytester.path / "lama_like.mnn.toml").write_text(SIDECAR)
    return ["--mnn-precisions", "high,low", "--mnn-model", "lama_like.mnn", "--mnn-reference", "lama_like.onnx"]


def _lama_with_sidecar_one_worker(pytester, models):
    models("multi_io.mnn")  # a second model in the same worker, after the one with a sidecar
    args = _lama_with_sidecar(pytester, models)[:-2]  # multi_io.mnn is no build of lama_like.onnx: its own reference
    return args + ["--mnn-model", "multi_io.mnn", "--mnn-worker-scope", "run"]


def _sidecar_for_another_model(pytester, models):
    models("demo/lama_like.mnn")
    (pytester.path / "lama_like.mnn.toml").write_text("[tolerance.outputs.nope]\natol = 0.1\n")
    return ["--mnn-precisions", "high", "--mnn-model", "lama_like.mnn"]


def _api_both(pytester, models):
    # One model, and the in-process run in a fresh process (_run): MNN's runtime managers are shared per
    # process, and an earlier model's module runs change a later one's last bits (a worker per model
    # starts clean), which would be no fault of the wire.
    models("demo/lama_like.mnn")
    return ["--mnn-precisions", "high", "--mnn-model", "lama_like.mnn", "--mnn-api", "both"]


def _sidecar_stream(pytester, models):
    models("stream/rnn_step.fp16.mnn", "stream/rnn_step.mnn")
    (pytester.path / "rnn_step.fp16.mnn.toml").write_text('[stream]\nstate = { h_out = "h" }\nsteps = 10\n')
    return ["--mnn-precisions", "high", "--mnn-model", "rnn_step.fp16.mnn", "--mnn-reference", "rnn_step.mnn"]


def _option_stream(pytester, models):
    models("stream/rnn_step.mnn")
    return ["--mnn-precisions", "low", "--mnn-model", "rnn_step.mnn", "--mnn-stream", "h_out->h;steps=4"]


def _run(pytester, mode: str, args: list[str], fresh: bool = False):
    run = pytester.runpytest_subprocess if fresh else pytester.runpytest
    result = run(*CPU, *args, "--mnn-isolate", mode, "--mnn-report", f"r-{mode}.json")
    return result, read_report(pytester.path / f"r-{mode}.json")["results"]


def _assert_same(isolated: list[dict], local: list[dict]) -> None:
    assert [r["nodeid"] for r in isolated] == [r["nodeid"] for r in local]
    for a, b in zip(isolated, local):
        assert a["worker"] is not None and a["worker"]["pid"] > 0, a["nodeid"]  # the worker really ran it
        assert b["worker"] is None, b["nodeid"]
        for key in set(a) | set(b):
            if key in ("seconds", "worker", "process"):
                continue
            if key == "message":  # the reproduce command repeats --mnn-isolate
                assert a[key].replace("=always", "=never") == b[key], a["nodeid"]
            else:
                assert a[key] == b[key], (a["nodeid"], key)


@pytest.mark.parametrize("setup, outcomes, check", [
    (_lama_with_sidecar, {"failed": 2, "errors": 2},
     lambda recs: recs["lama_like.mnn::parity[photo1-CPU-low]"]["outputs"]["inpainted"]["tolerance"]["atol"] == 1e-9
     and recs["lama_like.mnn::parity[photo1-CPU-low]"]["outputs"]["inpainted"]["decided_by"] == "outside fraction"
     and "no such image" in recs["lama_like.mnn::parity[broken-CPU-high]"]["message"]),
    (_lama_with_sidecar_one_worker, {"passed": 4, "errors": 2},
     lambda recs: len({r["worker"]["pid"] for r in recs.values()}) == 1),
    (_sidecar_for_another_model, {"errors": 1},
     lambda recs: "has no output 'nope'" in recs["lama_like.mnn::parity[CPU-high]"]["message"]),
    (_api_both, {"passed": 2},
     lambda recs: recs["lama_like.mnn::parity[module-CPU-high]"]["cross_api"]["compared"]
     and recs["lama_like.mnn::parity[module-CPU-high]"]["api"] == "module"),
    (_sidecar_stream, {"failed": 1},
     lambda recs: recs["rnn_step.fp16.mnn::parity[CPU-high]"]["stream"]["declared_by"]
     == "sidecar rnn_step.fp16.mnn.toml [stream]"),
    (_option_stream, {"passed": 1},
     lambda recs: recs["rnn_step.mnn::parity[CPU-low]"]["stream"]["steps_run"] == 4),
], ids=["input-sets-and-tolerances", "one-worker-for-the-run", "sidecar-model-mismatch", "api-both", "sidecar-stream", "option-stream"])
def test_isolated_items_give_the_in_process_results(pytester, models, monkeypatch, setup, outcomes, check):
    args = setup(pytester, models)
    fresh = setup is _api_both
    if fresh:
        monkeypatch.setenv("PYTHONPATH", plugin_env()["PYTHONPATH"])
    isolated, isolated_records = _run(pytester, "always", args)
    local, local_records = _run(pytester, "never", args, fresh)
    isolated.assert_outcomes(**outcomes)
    local.assert_outcomes(**outcomes)
    _assert_same(isolated_records, local_records)
    assert check(results_by_nodeid({"results": isolated_records}))


def test_isolated_pictures_are_the_in_process_pictures(pytester, models):
    """The worker draws them into the same folder: same files, same bytes, same links in the JSON and HTML."""
    models("collapse/partial_zero.fp16.mnn", "collapse/partial_zero.mnn")
    args = ["--mnn-precisions", "high", "--mnn-model", "partial_zero.fp16.mnn", "--mnn-reference", "partial_zero.mnn",
            "--mnn-artifacts", "art", "--mnn-html", "r.html"]
    pictures = {}
    records = {}
    for mode in ("always", "never"):
        shutil.rmtree(pytester.path / "art", ignore_errors=True)
        result, records[mode] = _run(pytester, mode, args)
        result.assert_outcomes(failed=1)
        pictures[mode] = {p.relative_to(pytester.path / "art").as_posix(): p.read_bytes()
                          for p in (pytester.path / "art").rglob("*.png")}
        assert len(parse_html((pytester.path / "r.html").read_text()).images) == len(pictures[mode])
    _assert_same(records["always"], records["never"])
    assert len(pictures["always"]) == 10 and pictures["always"] == pictures["never"]


def test_isolated_workers_save_the_bundle_the_in_process_run_saves(pytester, models):
    models("multi_io.mnn")
    bundles = {}
    records = {}
    for mode in ("always", "never"):
        result, records[mode] = _run(pytester, mode, ["--mnn-precisions", "high,low", "--mnn-model", "multi_io.mnn",
                                                      "--mnn-save-outputs", f"B-{mode}"])
        result.assert_outcomes(passed=2)
        folder = pytester.path / f"B-{mode}"
        bundles[mode] = {e["id"]: e for e in read_entries(folder)}
        for entry in bundles[mode].values():
            entry.pop("created")
            with np.load(folder / "entries" / entry["outputs_file"]) as arrays:
                entry["arrays"] = {k: arrays[k].tobytes() for k in arrays.files}
    _assert_same(records["always"], records["never"])
    assert {(e["kind"], e["config"]["id"]) for e in bundles["always"].values()} == {
        ("reference", "CPU-high"), ("config", "CPU-high"), ("config", "CPU-low")}
    assert bundles["always"] == bundles["never"]


def test_a_crash_in_a_named_input_set_fails_that_item_with_its_label_and_the_run_goes_on(pytester, models,
                                                                                          monkeypatch):
    models("inputs/lama_like.mnn", "inputs/lama_like.mnn.toml", *(f"inputs/{n}{i}.png" for n in ("photo", "mask")
                                                                   for i in (1, 2)))
    monkeypatch.setenv(FAULT_INJECTION_ENV, "SIGSEGV:CPU-low")
    result, records = _run(pytester, "always", ["--mnn-precisions", "high,low", "--mnn-model", "lama_like.mnn"])
    result.assert_outcomes(passed=2, failed=2)
    by_id = results_by_nodeid({"results": records})
    for name in ("photo1", "photo2"):
        crashed = by_id[f"lama_like.mnn::parity[{name}-CPU-low]"]
        assert (crashed["category"], crashed["input_set"]) == ("crashed", name)
        assert crashed["fault"]["signal"] == "SIGSEGV" and crashed["fault"]["returncode"] == -signal.SIGSEGV
        assert f"inputs:    {name}\n" in crashed["message"]
        assert f"--mnn-isolate=always --mnn-input-sets {name}" in crashed["message"]
        passed = by_id[f"lama_like.mnn::parity[{name}-CPU-high]"]
        assert (passed["category"], passed["input_set"]) == ("ok", name) and passed["worker"]["pid"] > 0
    # After each crash a fresh worker: photo2's items never ran in photo1's dead worker.
    assert by_id["lama_like.mnn::parity[photo2-CPU-high]"]["worker"]["pid"] != \
        by_id["lama_like.mnn::parity[photo1-CPU-low]"]["worker"]["pid"]


def test_a_model_that_crashes_mnn_is_one_crashed_item_also_with_a_sidecar(tmp_path):
    """A real crasher: a bit flip of healthy.mnn that MNN 3.6.1 segfaults on while creating a session
    (test_bad_input.KNOWN_CRASHERS).  With a sidecar beside it, the pytest process used to load it to check
    the sidecar, and died; now the worker checks the sidecar.  In a child pytest: a crash here is the bug."""
    healthy = (COLLAPSE / "healthy.mnn").read_bytes()
    flipped = bytearray(healthy)
    flipped[350] ^= 1 << 4
    (tmp_path / "flip.mnn").write_bytes(bytes(flipped))
    (tmp_path / "good.mnn").write_bytes(healthy)
    for name in ("flip", "good"):
        (tmp_path / f"{name}.mnn.toml").write_text('[input_sets.g]\nimage = { generator = "uniform" }\n')
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *CPU, "--mnn-precisions", "high",
                           "--mnn-model", "flip.mnn", "--mnn-model", "good.mnn", "--mnn-isolate", "always",
                           "--mnn-report", "r.json"], cwd=tmp_path, env=plugin_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, (proc.stdout + proc.stderr)[-3000:]
    by_model = {r["model"]: r for r in read_report(tmp_path / "r.json")["results"]}
    assert (by_model["good.mnn"]["category"], by_model["good.mnn"]["input_set"]) == ("ok", "g")
    flip = by_model["flip.mnn"]
    assert flip["category"] in ("crashed", "model_error", "runtime_error"), flip  # crashed on MNN 3.6.1
    if flip["category"] == "crashed":
        assert flip["input_set"] == "g" and flip["fault"]["signal"] in ("SIGSEGV", "SIGFPE", "SIGBUS")


def test_settings_cross_whole_and_a_sink_no_worker_can_call_is_refused():
    writer = ArtifactWriter("pics", "always")
    streams = (parse_stream("model=rnn*.mnn;h_out->h;steps=3"),)
    settings = ParitySettings(seed=3, streams=streams, output_sink=writer, keep_outputs=True, api="both")
    back = wire.settings_from_wire(wire.loads(wire.dumps(wire.settings_to_wire(settings))))
    assert back.streams == streams and back.streams[0].origin == streams[0].origin
    assert (type(back.output_sink), back.output_sink.root, back.output_sink.when) == (ArtifactWriter, writer.root,
                                                                                       "always")
    assert (back.seed, back.keep_outputs, back.api) == (3, True, "both")
    with pytest.raises(ValueError, match="cannot run in an isolated worker.*only artifacts.ArtifactWriter"):
        IsolatedEngine(ParitySettings(output_sink=lambda *args: None), prespawn=False)


def test_an_input_set_crosses_with_the_error_found_when_its_sidecar_was_read(tmp_path):
    for name in ("lama_like.mnn", "photo1.png", "mask1.png"):
        shutil.copyfile(FIXTURES / "inputs" / name, tmp_path / name)
    (tmp_path / "lama_like.mnn.toml").write_text(SIDECAR)
    good, broken = find_sidecar(tmp_path / "lama_like.mnn", tmp_path).input_sets
    files = PickleFiles()
    try:
        sent = [files.to_wire(s) for s in (good, broken, good)]
        assert sent[0] == sent[2] and len({s["file"] for s in sent}) == 2  # each set written once
        cache: dict = {}
        good_back, broken_back = (from_wire(s, cache) for s in sent[:2])
    finally:
        files.close()
    assert good_back.describe() == good.describe()
    assert type(broken_back.error) is type(broken.error) and str(broken_back.error) == str(broken.error)
    assert broken_back.error.fix == broken.error.fix and "no such image" in str(broken_back.error)


_VALUES = st.none() | st.dictionaries(st.sampled_from(["atol", "rtol", "min_cosine", "max_outside_fraction"]),
                                      st.floats(0, 1), min_size=1)


@given(specs(), st.text(min_size=1, max_size=20),
       st.dictionaries(st.text(min_size=1, max_size=8), st.lists(st.tuples(st.text(max_size=20), _VALUES),
                                                                  max_size=4), max_size=3))
def test_streams_and_tolerance_layers_survive_the_json_line(spec, origin, layers):
    from dataclasses import replace

    spec = replace(spec, origin=origin)
    back = stream_from_wire(wire.loads(wire.dumps(stream_to_wire(spec))))
    assert back == spec and back.origin == origin
    assert per_name_from_wire(wire.loads(wire.dumps(per_name_to_wire(layers)))) == {
        name: [(source, values or None) for source, values in value] for name, value in layers.items()}
