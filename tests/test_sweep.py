"""The op sweep (--mnn-op-sweep) and repro bundles (--mnn-repro), on real models built by fixtures/.

sweep/broken.fp16.mnn: one op (tiny_conv) broken by --fp16 inside a healthy network, where the trace's
first divergent layer is an encoder conv that only accumulated rounding error.  sweep/accumulate.fp16.mnn:
twelve layers each right alone, wrong stacked.  The sweep must tell the two apart.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, read_report, results_by_nodeid
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.report.html import render
from pytest_mnn_parity.trace.sweep import VERDICTS, CutCache, SweepResult, SweepRow

SWEEP = FIXTURES / "sweep"
CPU_LOW = RunConfig("CPU", "low")
FLAGS = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low")


def check(name: str, mode: str = "flagged", **extra):
    engine = ParityEngine(ParitySettings(reference=str(SWEEP / f"{name}.mnn"), op_sweep=mode, **extra))
    return engine.check(SWEEP / f"{name}.fp16.mnn", CPU_LOW)


@pytest.fixture(scope="module")
def broken():
    return check("broken")


@pytest.fixture(scope="module")
def accumulated():
    return check("accumulate")


def test_the_op_broken_alone_replaces_the_traces_guess(broken):
    swept = broken.op_sweep
    assert broken.category.value == "zero_output"
    # The trace blames an encoder conv: the first op out of tolerance with its inputs within it.
    assert broken.trace.first_divergent.name == swept.trace_blamed == "enc3_conv"
    rows = {row.op: row for row in swept.rows}
    assert swept.culprit is rows["tiny_conv"]
    assert rows["tiny_conv"].verdict == "broken" and rows["tiny_conv"].category == "zero_output"
    assert rows["tiny_conv"].cosine == 0.0 and rows["tiny_conv"].outside_fraction > 0.99
    assert rows["enc3_conv"].verdict == "accumulated" and rows["enc3_conv"].category == "ok"
    assert rows["out"].verdict == "upstream"  # the gain multiply is exact alone; its input was zeros already
    assert broken.first_divergent_layer["name"] == "tiny_conv"
    assert broken.first_divergent_layer["proven_by"] == "op sweep"
    assert broken.first_divergent_layer["trace_guess"] == "enc3_conv"
    message = broken.message
    assert "broken op: tiny_conv (Convolution, #7) [zero_output alone]" in message
    assert "first out of tolerance in the graph: enc3_conv (Convolution, #4); its inputs were within tolerance: " \
           "the op sweep finds it accumulated" in message
    assert "<- broken alone (op sweep)" in message


def test_accumulated_error_has_no_broken_op(accumulated):
    swept = accumulated.op_sweep
    assert accumulated.category.value == "mismatch"
    assert swept.culprit is None and swept.broken == []
    ran = [row for row in swept.rows if row.verdict != "not_cut"]
    assert len(ran) == 11  # scale1..scale10 and out: every layer out of tolerance in the graph
    assert {row.verdict for row in ran} == {"accumulated", "upstream"}
    assert [row.op for row in ran if row.verdict == "accumulated"] == ["scale1"]
    # Each is within tolerance alone: the one-layer error (9.7e-4 relative) is under rtol 1e-3.
    assert all(row.category == "ok" and row.max_abs < 1e-3 for row in ran)
    assert swept.conclusion().startswith("no op is wrong alone")
    assert accumulated.first_divergent_layer["name"] == "scale1" and "proven_by" not in \
        accumulated.first_divergent_layer
    # Twelve identical layers: one cut file, the others found identical and reused.
    assert sum(row.cut == "cached" for row in ran) == 10


def test_an_op_that_cannot_be_cut_says_why(broken):
    raster = next(row for row in broken.op_sweep.rows if row.type == "Raster")
    assert raster.verdict == "not_cut" and "no op of that name in the file" in raster.reason
    assert raster.max_abs is None


def test_all_sweeps_every_op_of_a_passing_item():
    engine = ParityEngine(ParitySettings(op_sweep="all"))
    result = engine.check(FIXTURES / "collapse" / "healthy.mnn", CPU_LOW)
    assert result.passed
    swept = result.op_sweep
    ran = [row for row in swept.rows if row.verdict != "not_cut"]
    assert len(ran) >= 3 and {row.verdict for row in ran} == {"ok"}
    assert all(row.max_abs == 0 for row in ran)  # x86 CPU low is fp32: bit-identical to the reference


def test_cut_cache_reuses_identical_ops(tmp_path):
    cache = CutCache()
    first = cache.cut(SWEEP / "accumulate.fp16.mnn", "scale1")
    again = cache.cut(SWEEP / "accumulate.fp16.mnn", "scale2")
    fp32 = cache.cut(SWEEP / "accumulate.mnn", "scale1")
    assert first.path == again.path and again.cached
    assert fp32.path != first.path  # other weights (fp32 vs the --fp16 build's): another cut
    assert cache.model(first).info.inputs[0].name == "in0"
    folder = cache.folder
    cache.close()
    assert not folder.exists()


_rows = st.builds(SweepRow, op=st.sampled_from(["a", "b", "c"]), type=st.just("Conv"),
                  occurrence=st.integers(0, 2), backend=st.just("CPU"), precision=st.just("low"),
                  verdict=st.sampled_from(VERDICTS),
                  category=st.sampled_from(["ok", "mismatch", "zero_output", "non_finite", ""]),
                  cosine=st.one_of(st.none(), st.floats(-1, 1)))


@settings(max_examples=60, deadline=None)
@given(st.lists(_rows, max_size=6))
def test_sweep_record_round_trips_and_blames_the_most_severe_broken_op(rows):
    swept = SweepResult("flagged", rows)
    again = SweepResult.from_dict(swept.as_dict())
    assert again.as_dict() == swept.as_dict()
    culprit = swept.culprit
    broken = [row for row in rows if row.verdict == "broken"]
    assert (culprit is None) == (not broken)
    if culprit is not None:
        order = ("non_finite", "zero_output", "constant_output", "partial_zero", "mismatch")
        rank = [order.index(r.category) if r.category in order else len(order) for r in broken]
        assert (order.index(culprit.category) if culprit.category in order else len(order)) == min(rank)


# -- the options, as a user runs them ----------------------------------------------------------------------


def test_op_sweep_option_reports_the_table_in_terminal_json_and_html(pytester, models):
    models("sweep/broken.fp16.mnn", "sweep/broken.mnn")
    result = pytester.runpytest(*FLAGS, "--mnn-model", "broken.fp16.mnn", "--mnn-reference", "broken.mnn",
                                "--mnn-op-sweep", "--mnn-report", "r.json", "--mnn-html", "r.html")
    result.assert_outcomes(failed=1)
    assert result.ret == 1
    out = result.stdout.str()
    assert "op sweep (each flagged op run alone on the reference's recorded inputs):" in out
    result.stdout.fnmatch_lines(["*broken.fp16.mnn*enc3_conv*Convolution*CPU-low*ok*FAIL*accumulated",
                                 "*broken.fp16.mnn*tiny_conv*Convolution*CPU-low*zero_output*zero*broken"])
    assert "--mnn-op-sweep=flagged" in out  # the reproduce line sweeps again
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["broken.fp16.mnn::parity[CPU-low]"]
    assert read_report(pytester.path / "r.json")["settings"]["op_sweep"] == "flagged"
    swept = rec["op_sweep"]
    assert swept["mode"] == "flagged" and swept["broken_op"] == {"name": "tiny_conv", "type": "Convolution",
                                                                 "occurrence": 0, "category": "zero_output"}
    assert swept["trace_blamed"] == "enc3_conv"
    assert rec["first_divergent_layer"]["name"] == "tiny_conv"
    assert {row["verdict"] for row in swept["rows"]} == {"broken", "accumulated", "upstream", "not_cut"}
    # MNN's session-made layout copy is a row of the JSON; the message and the terminal table count it instead.
    made = [row for row in swept["rows"] if row["verdict"] == "not_cut" and row["type"] == "Raster"]
    assert made and "not cut: made by MNN at session time" not in out
    assert f"and {len(made)} flagged tensor(s) MNN made at session time" in out
    assert f"(and {len(made)} flagged tensor(s) MNN made at session time" in out
    page = (pytester.path / "r.html").read_text()
    assert "Op sweep: flagged ops run alone" in page and "Broken op (proven alone)" in page
    assert 'class="sweep-broken" data-op="tiny_conv"' in page
    assert "Op sweep: flagged ops run alone" in render(read_report(pytester.path / "r.json"))  # a saved report too


def test_op_sweep_ini_key_all_on_a_healthy_model_passes(pytester, models):
    models("collapse/healthy.mnn")
    pytester.makeini("[pytest]\nmnn_op_sweep = all\n")
    result = pytester.runpytest(*FLAGS, "--mnn-model", "healthy.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(passed=1)
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert rec["op_sweep"]["mode"] == "all" and rec["op_sweep"]["broken_op"] is None
    assert {row["verdict"] for row in rec["op_sweep"]["rows"]} <= {"ok", "not_cut"}
    assert "op sweep" in result.stdout.str() and "no op was flagged" in result.stdout.str()


def test_op_sweep_value_must_be_known(pytester):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", "--mnn-op-sweep=flaged")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--mnn-op-sweep: expected one of off, flagged, all, got 'flaged'*did you mean "
                                 "'flagged'*"])


def _run_script(folder):
    return subprocess.run([sys.executable, "repro.py"], cwd=folder, capture_output=True, text=True, timeout=120)


def test_repro_bundles_run_with_plain_mnn(pytester, models):
    models("sweep/broken.fp16.mnn", "sweep/broken.mnn", "sweep/accumulate.fp16.mnn", "sweep/accumulate.mnn")
    runs = [pytester.runpytest(*FLAGS, "--mnn-model", f"{name}.fp16.mnn", "--mnn-reference", f"{name}.mnn",
                               "--mnn-op-sweep", "--mnn-repro", "repro", "--mnn-report", f"{name}.json")
            for name in ("broken", "accumulate")]
    for run in runs:
        run.assert_outcomes(failed=1)
    root = pytester.path / "repro"
    broken, accumulated = root / "broken.fp16.mnn-CPU-low", root / "accumulate.fp16.mnn-CPU-low"
    assert sorted(p.name for p in broken.iterdir()) == ["ISSUE.md", "expected.npz", "inputs.npz", "model.mnn",
                                                        "repro.py"]
    rec = read_report(pytester.path / "broken.json")["results"][0]
    assert rec["repro"] == {"dir": str(broken), "what": "the op tiny_conv (Convolution) alone", "failed": True}
    assert f"repro:     {broken}" in runs[0].stdout.str()
    issue = (broken / "ISSUE.md").read_text()
    for text in ("# Wrong result on CPU precision low: zero_output", "MNN: 3.", "backend requested: CPU",
                 "| out0 | 4.892e-08 | 0.000000 | 99.90% | outside fraction |", "python repro.py",
                 "pytest --mnn-only --mnn-model broken.fp16.mnn", "Op sweep: broken op: tiny_conv"):
        assert text in issue
    # The broken op alone, on its recorded inputs: the script fails as the plugin did, with its numbers.
    failing = _run_script(broken)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "out0: max|d| 4.892e-08  cosine 0.000000  outside 99.90%  -> outside fraction  FAIL" in failing.stdout
    # The same op cut from the healthy fp32 build, same inputs: the script passes.
    cache = CutCache()  # kept: its folder goes with it
    healthy = cache.cut(pytester.path / "broken.mnn", "tiny_conv")
    shutil.copyfile(healthy.path, broken / "model.mnn")
    passing = _run_script(broken)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "-> within tolerance  ok" in passing.stdout or "-> exact  ok" in passing.stdout
    # No op is broken alone: the model up to its first divergent layer, which still fails.
    assert "the model up to its first divergent layer scale1" in (accumulated / "ISSUE.md").read_text()
    inputs = np.load(accumulated / "inputs.npz")
    assert inputs.files == ["image"] and inputs["image"].shape == (1, 3, 16, 16)
    assert _run_script(accumulated).returncode == 1
