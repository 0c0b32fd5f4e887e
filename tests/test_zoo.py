"""A model zoo in one run: ONNX test-data sets as inputs and expected outputs, an MNN abort that costs its items
and not the run, and the conformance scoreboard by op type (issue 26).

The fixtures are fixtures/testdata/ (build_fixtures.py: the ONNX test-data layout, an opset-6 model ONNX
Runtime refuses, and a graph that aborts MNN) and the onnx wheel's own backend test data.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.report import scoreboard
from pytest_mnn_parity.report.html import render

from conftest import FIXTURES, read_report, results_by_nodeid

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

CPU_HIGH = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-convert", "fp32",
            "--mnn-layers", "off")
TESTDATA = FIXTURES / "testdata"


def _zoo(pytester, *names: str, sets: bool = True) -> Path:
    """Copy fixtures/testdata/<name> folders under zoo/ (model.onnx alone with ``sets=False``)."""
    for name in names:
        if sets:
            shutil.copytree(TESTDATA / name, pytester.path / "zoo" / name)
        else:
            (pytester.path / "zoo" / name).mkdir(parents=True)
            shutil.copyfile(TESTDATA / name / "model.onnx", pytester.path / "zoo" / name / "model.onnx")
    return pytester.path / "zoo"


def _write_tensor(path: Path, array: np.ndarray, name: str = "") -> None:
    path.write_bytes(numpy_helper.from_array(array, name).SerializeToString())


# -- 1. test-data sets as input sets, stored outputs as the reference -------------------------------------


def test_test_data_sets_are_named_input_sets_judged_against_their_stored_outputs(pytester):
    _zoo(pytester, "scale_shift")
    model = "zoo/scale_shift/model.onnx"
    ids = [line for line in pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo", "--collect-only", "-q").outlines
           if "::" in line]
    assert ids == [f"{model}::parity[fp32-test_data_set_{n}-CPU-high]" for n in (0, 1)]
    pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-report", "r.json").assert_outcomes(passed=2)
    records = results_by_nodeid(read_report(pytester.path / "r.json"))
    first = records[ids[0]]
    assert first["reference_label"] == "test-data" and first["input_set"] == "test_data_set_0"
    assert "stored outputs" in first["reference"] and "test_data_set_0/output_*.pb" in first["reference"]
    # Set 0's tensors have no names (as in the onnx wheel): matched by position to x and bias.
    assert "x <- test_data_set_0/input_0.pb" in first["input_detail"]
    assert "bias <- test_data_set_0/input_1.pb" in first["input_detail"]

    # The stored outputs are the reference, not ONNX Runtime (which agrees with MNN): shift set 1's by 0.5.
    stored = pytester.path / "zoo" / "scale_shift" / "test_data_set_1" / "output_0.pb"
    tensor = onnx.TensorProto()
    tensor.ParseFromString(stored.read_bytes())
    _write_tensor(stored, numpy_helper.to_array(tensor) + np.float32(0.5), tensor.name)
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-report", "r.json")
    result.assert_outcomes(passed=1, failed=1)
    failed = results_by_nodeid(read_report(pytester.path / "r.json"))[ids[1]]
    # Relu'd outputs: MNN's zeros where the shifted reference is 0.5 make it partial_zero, else mismatch.
    assert failed["category"] in ("partial_zero", "mismatch") and failed["reference_label"] == "test-data"


def test_a_sidecar_names_test_data_folders_kept_elsewhere(pytester):
    shutil.copyfile(TESTDATA / "scale_shift" / "model.onnx", pytester.path / "m.onnx")
    shutil.copytree(TESTDATA / "scale_shift" / "test_data_set_1", pytester.path / "sets" / "test_data_set_1")
    (pytester.path / "m.onnx.toml").write_text('test_data = "sets"\n')
    pytester.runpytest(*CPU_HIGH, "--mnn-model", "m.onnx", "--mnn-report", "r.json").assert_outcomes(passed=1)
    (record,) = read_report(pytester.path / "r.json")["results"]
    assert record["nodeid"] == "m.onnx::parity[fp32-test_data_set_1-CPU-high]"
    assert record["reference_label"] == "test-data"

    (pytester.path / "m.onnx.toml").write_text('test_data = ["sets", "missing"]\n')
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "m.onnx")
    assert result.ret == 1
    text = result.stdout.str()
    assert "m.onnx.toml" in text and "test_data" in text and "missing: no such folder" in text
    assert "paths are relative to the sidecar" in text


def test_a_model_onnx_runtime_cannot_load_falls_back_to_mnn_cpu_high_with_a_note(pytester):
    """An opset-6 BatchNormalization: ONNX Runtime has no kernel for it, MNN runs it.  Without stored outputs
    the reference is MNN CPU/high, said so; with them, the stored outputs.  Never a bare model_error."""
    _zoo(pytester, "old_opset_bn", sets=False)
    result = pytester.runpytest(*CPU_HIGH[:-2], "--mnn-precisions", "high,low", "--mnn-model", "zoo",
                                "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    for record in read_report(pytester.path / "r.json")["results"]:
        assert record["reference_label"] == "cpu (onnxruntime cannot load the model)"
        assert "ONNX Runtime cannot be the reference" in record["reference"]
        assert "BatchNormalization(6)" in record["reference"]
    shutil.rmtree(pytester.path / "zoo")
    _zoo(pytester, "old_opset_bn")
    pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-report", "r.json").assert_outcomes(passed=1)
    (record,) = read_report(pytester.path / "r.json")["results"]
    assert record["reference_label"] == "test-data" and "BatchNormalization(6)" in record["reference"]


# -- 2. no model takes the run down --------------------------------------------------------------------------


def test_the_abort_fixture_really_aborts_raw_mnn_while_it_creates_a_cpu_session(tmp_path):
    from pytest_mnn_parity.onnx.convert import convert_onnx

    target = tmp_path / "abort.mnn"
    convert_onnx(TESTDATA / "sequence_abort" / "model.onnx", target)
    code = ("import MNN, sys\n"
            "net = MNN.Interpreter(sys.argv[1])\n"
            "print('loaded', flush=True)\n"
            "net.createSession({'backend': 'CPU', 'precision': 'high', 'numThread': 1})\n"
            "print('session created', flush=True)\n")
    child = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGABRT, (child.returncode, child.stdout, child.stderr)
    assert "loaded" in child.stdout and "session created" not in child.stdout


def test_a_model_that_aborts_mnn_fails_its_item_and_the_run_goes_on(pytester):
    _zoo(pytester, "sequence_abort", "scale_shift")
    # In a child pytest: were the protection gone, the abort would end the test run itself.
    result = pytester.runpytest_subprocess(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == 1
    records = read_report(pytester.path / "r.json")["results"]
    crashed = [r for r in records if r["category"] == "crashed"]
    assert [r["model"] for r in crashed] == ["zoo/sequence_abort/model.onnx"]
    message = crashed[0]["message"]
    assert "SIGABRT" in message.splitlines()[0]
    said = next(line for line in message.splitlines() if line.startswith("MNN said:"))
    assert said.removeprefix("MNN said:").strip() and said.removeprefix("MNN said:").strip() in crashed[0]["fault"][
        "mnn_said"]
    assert "op types:  SequenceConstruct, ConcatFromSequence" in message
    assert crashed[0]["op_types"] == ["SequenceConstruct", "ConcatFromSequence"]
    # The one warm CPU worker served the models before and after the crash (a fresh one after it).
    assert all(r["worker"] and r["worker"]["pid"] > 0 for r in records)

    # Without isolation the same run dies of the abort: the protection is what keeps it alive.
    dead = pytester.runpytest_subprocess(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-isolate", "never")
    assert dead.ret not in (0, 1), dead.ret


# -- 3. the scoreboard ---------------------------------------------------------------------------------------

_CATEGORIES = ["ok", "mismatch", "shape_mismatch", "crashed", "timeout", "runtime_error", "degenerate_reference",
               "internal_error"]
_records = st.lists(
    st.tuples(st.integers(0, 7),  # model
              st.sampled_from(["high", "low"]),
              st.sampled_from(_CATEGORIES + ["model_error:convert", "model_error:session", "model_error:other",
                                             "skip"])),
    min_size=1, max_size=60)
_ops = st.lists(st.lists(st.sampled_from(["Conv", "Relu", "Add", "Loop"]), max_size=3, unique=True),
                min_size=8, max_size=8)


def _record(model: int, precision: str, kind: str, ops: list[str]) -> dict:
    category, _, why = kind.partition(":")
    message = {"convert": "m.onnx: MNN cannot convert it (variant fp32: ...)",
               "session": "m.onnx: MNN could not create a session for CPU high", "other": "no reference"}.get(why, "")
    return {"nodeid": f"m{model}.onnx::parity[fp32-CPU-{precision}]", "model": f"m{model}.onnx", "backend": "CPU",
            "precision": precision, "variant": "fp32", "category": "backend_unavailable" if kind == "skip" else category,
            "outcome": "skipped" if kind == "skip" else ("passed" if category == "ok" else "failed"),
            "message": message, "op_types": ops}


@settings(max_examples=60, deadline=None)
@given(_records, _ops)
def test_the_scoreboard_adds_up(raw, ops):
    records = [_record(m, p, kind, ops[m]) for m, p, kind in raw]
    board = scoreboard.build(records)
    judged = {(r["model"], r["precision"]) for r in records if r["outcome"] != "skipped"}
    if not any(ops[int(m[1:].split(".")[0])] for m, _ in judged):
        assert board is None
        return
    models = {m for m, _ in judged}
    assert board["models"] == len(models) == len(board["per_model"])
    for config in board["configs"]:
        precision = config.rsplit("-", 1)[1]
        with_config = {m for m, p in judged if p == precision}
        assert sum(board["totals"]["configs"][config].values()) == len(with_config)
        for op, row in board["op_types"].items():
            using = {m for m in with_config if op in board["per_model"][m]["op_types"]}
            counts = row["configs"][config]
            assert sum(counts.values()) == len(using) <= row["models"]
            assert scoreboard.converts(counts) == len(using) - counts["convert_failed"]
            assert scoreboard.runs(counts) <= scoreboard.converts(counts)
    # Each model's status is the worst of its items: a crash of one input set is not hidden by another's pass.
    for (model, precision) in judged:
        statuses = [scoreboard.status_of(r) for r in records if (r["model"], r["precision"]) == (model, precision)]
        worst = min((s for s in statuses if s), key=scoreboard.STATUSES.index)
        assert board["per_model"][model]["configs"][f"fp32-CPU-{precision}"] == worst


def test_the_terminal_shows_the_scoreboard_for_a_zoo_only():
    few = [_record(m, "high", "ok", ["Relu"]) for m in range(scoreboard.MIN_MODELS - 1)]
    assert scoreboard.terminal_lines(few) == []
    many = few + [_record(9, "high", "crashed", ["Relu", "Loop"])]
    lines = scoreboard.terminal_lines(many)
    assert lines[0].startswith(f"conformance by ONNX op type: {scoreboard.MIN_MODELS} models, 2 op types")
    assert lines[2].split()[:2] == ["(all", "models)"] and "4/5 agree, 1 crash" in lines[2]
    assert lines[3].split()[:2] == ["Loop", "1"]  # the op with a failure comes first


# -- 4. the onnx wheel's own test data, in one run -----------------------------------------------------------

# Measured with MNN 3.6.1 and onnx 1.23 (140 models), CPU high, fp32: 102 agree, 20 diverge (8 of them the
# Conv1d (N,C,L,1) shape), 3 inconclusive (constant stored outputs), 8 do not convert, 6 do not run, 1 aborts.
WHEEL_AGREE_AT_LEAST = 102
WHEEL_NOT_RUNNING_AT_MOST = 15  # convert_failed + run_failed + crashed


def test_the_onnx_wheels_own_test_data_in_one_run(pytester):
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    names = ("pytorch-converted", "pytorch-operator", "simple")
    if not all((data / name).is_dir() for name in names):
        pytest.skip(f"this onnx wheel ships no backend test data under {data}")
    for name in names:  # copied: node ids relative to the run's own folder, as a user's zoo
        shutil.copytree(data / name, pytester.path / "zoo" / name)
    expected = sorted(str(Path(p).relative_to(pytester.path)) for p in (pytester.path / "zoo").glob("*/*/model.onnx"))
    result = pytester.runpytest_subprocess(*CPU_HIGH, "--mnn-model", "zoo", "--mnn-report", "r.json",
                                           "--mnn-html", "r.html", "-p", "no:cacheprovider")
    assert result.ret == 1  # failures, never an abort (134) that ends the run
    report = read_report(pytester.path / "r.json")
    reported = {r["model"] for r in report["results"]}
    assert reported == set(expected)  # every model reported: no crash ended the run
    board = report["scoreboard"]
    assert board["configs"] == ["fp32-CPU-high"] and board["models"] == len(expected)
    totals = board["totals"]["configs"]["fp32-CPU-high"]
    assert sum(totals.values()) == len(expected)
    assert totals["agreed"] >= WHEEL_AGREE_AT_LEAST, totals
    assert totals["convert_failed"] + totals["run_failed"] + totals["crashed"] <= WHEEL_NOT_RUNNING_AT_MOST, totals
    assert totals["crashed"] >= 1  # the SequenceConstruct + ConcatFromSequence abort, contained
    for op, row in board["op_types"].items():
        assert sum(row["configs"]["fp32-CPU-high"].values()) == row["models"], op
    assert board["op_types"]["ConcatFromSequence"]["configs"]["fp32-CPU-high"]["crashed"] >= 1
    # The short table in the terminal, the whole one in the HTML report (rendered from the JSON alone, too).
    result.stdout.fnmatch_lines([f"conformance by ONNX op type: {len(expected)} models, * op types*",
                                 "(all models)*agree*"])
    page = (pytester.path / "r.html").read_text()
    assert "Conformance by ONNX op type" in page and 'data-op="ConcatFromSequence"' in page
    assert 'data-op="ConcatFromSequence"' in render(report)


def test_each_mnn_release_is_a_scoreboard_column_of_its_own():
    """--mnn-versions: the same table across MNN releases (a crash in one release, agreement in the other)."""
    old, new = _record(0, "high", "crashed", ["Concat"]), _record(0, "high", "ok", ["Concat"])
    old["mnn_version"] = "3.4.0"
    board = scoreboard.build([old, new])
    assert board["configs"] == ["mnn3.4.0-fp32-CPU-high", "fp32-CPU-high"]
    row = board["op_types"]["Concat"]["configs"]
    assert row["mnn3.4.0-fp32-CPU-high"]["crashed"] == 1 and row["fp32-CPU-high"]["agreed"] == 1
