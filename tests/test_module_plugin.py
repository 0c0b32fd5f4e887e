"""--mnn-api in every mode, as a user runs it: pytester sessions on real models."""
from __future__ import annotations

import shlex

import pytest

from conftest import read_report, results_by_nodeid

CPU_HIGH = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high")


@pytest.fixture
def two_models(models):
    models("control_flow/if_branch.mnn", "demo/lama_like.mnn")
    return ["--mnn-model", "if_branch.mnn", "--mnn-model", "lama_like.mnn"]


def test_auto_is_the_default_and_says_which_api_ran_and_why(pytester, two_models):
    result = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["if_branch.mnn*PASS (module) max|d|*", "lama_like.mnn*PASS max|d|*"])
    report = read_report(pytester.path / "r.json")
    assert report["settings"]["api"] == "auto"
    by_id = results_by_nodeid(report)
    control = by_id["if_branch.mnn::parity[CPU-high]"]
    assert control["api"] == "module" and control["api_axis"] is False
    assert control["api_reason"].startswith("auto: the session API cannot run this model (the reference run "
                                            "failed: runSession returned 3 (COMPUTE_SIZE_ERROR)")
    assert control["backend_used"] is None and "cannot read back" in control["backend_note"]
    plain = by_id["lama_like.mnn::parity[CPU-high]"]
    assert plain["api"] == "session" and plain["backend_used"] == "CPU" and plain["backend_note"] == ""


def test_session_mode_fails_control_flow_with_the_shape_error(pytester, two_models):
    result = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "session")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*runtime_error on CPU-high: runSession returned 3 (COMPUTE_SIZE_ERROR)*",
                                 "*MNN said: Compute Shape Error for out*",
                                 "*hint: *--mnn-api auto or module*--useOriginRNNImpl*",
                                 "*reproduce: pytest * --mnn-api session*"])


def test_module_mode_runs_everything_on_the_module_api(pytester, two_models):
    result = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "module", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    for rec in read_report(pytester.path / "r.json")["results"]:
        assert rec["api"] == "module" and rec["api_reason"] == "--mnn-api module"
        assert rec["backend_used"] is None and rec["forward_type"] is None


def test_both_is_a_matrix_axis_and_compares_the_apis(pytester, two_models):
    ids = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "both", "--collect-only", "-q")
    assert {"if_branch.mnn::parity[session-CPU-high]", "if_branch.mnn::parity[module-CPU-high]",
            "lama_like.mnn::parity[session-CPU-high]", "lama_like.mnn::parity[module-CPU-high]"} <= set(ids.outlines)
    result = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "both", "--mnn-report", "r.json")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["model*session-CPU-high*module-CPU-high",
                                 "if_branch.mnn*FAIL runtime_error*PASS max|d|*"])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    cross = by_id["lama_like.mnn::parity[module-CPU-high]"]["cross_api"]
    assert cross["compared"] and cross["category"] == "ok" and "inpainted" in cross["outputs"]
    assert by_id["lama_like.mnn::parity[session-CPU-high]"]["cross_api"] is None
    control = by_id["if_branch.mnn::parity[module-CPU-high]"]
    assert control["cross_api"]["compared"] is False and control["api_axis"] is True
    only_module = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "both", "-k", "module")
    only_module.assert_outcomes(passed=2, deselected=2)


def test_both_reproduce_command_reruns_the_item(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "zero.fp16.mnn", "--mnn-reference", "zero.mnn",
                                "--mnn-api", "both")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*zero_output on CPU-high (module API): output 'out'*"])
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines
                   if "reproduce: " in line and "-k module-CPU-high" in line)
    argv = shlex.split(command)
    assert argv[argv.index("--mnn-api") + 1] == "both" and argv[argv.index("-k") + 1] == "module-CPU-high"
    again = pytester.runpytest(*argv[1:])
    again.assert_outcomes(failed=1, deselected=1)
    assert "zero_output on CPU-high (module API)" in again.stdout.str()


def test_api_ini_key_and_bad_value(pytester, two_models):
    pytester.makeini("[pytest]\nmnn_api = session\n")
    result = pytester.runpytest(*CPU_HIGH, *two_models)
    result.assert_outcomes(passed=1, failed=1)
    bad = pytester.runpytest(*CPU_HIGH, *two_models, "--mnn-api", "interpreter")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--mnn-api: expected one of auto, session, module, both, got 'interpreter'" in bad.stderr.str()


def test_lstm_while_and_origin_builds_under_auto_junit(pytester, models):
    import xml.etree.ElementTree as ET

    models("control_flow/lstm_while.mnn", "control_flow/lstm_origin.mnn")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "lstm_while.mnn", "--mnn-model", "lstm_origin.mnn",
                                "--junitxml", "j.xml")
    result.assert_outcomes(passed=2)
    apis = {case.get("classname"): {p.get("name"): p.get("value") for p in case.iter("property")}["mnn_api"]
            for case in ET.parse(pytester.path / "j.xml").iter("testcase")}
    assert apis == {"lstm_while.mnn": "module", "lstm_origin.mnn": "session"}


@pytest.mark.parametrize("api", ["session", "module"])
def test_shape_and_dtype_mismatch_are_named_with_both_sides(pytester, models, api):
    models("interface/conv_out.mnn", "interface/conv_out_flat.mnn", "interface/conv_out_int.mnn")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "conv_out_flat.mnn", "--mnn-model", "conv_out_int.mnn",
                                "--mnn-reference", "conv_out.mnn", "--mnn-api", api, "--mnn-report", "r.json")
    result.assert_outcomes(failed=2)
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    flat = by_id["conv_out_flat.mnn::parity[CPU-high]"]["outputs"]["out"]
    assert flat["category"] == "shape_mismatch"
    assert flat["detail"] == "shape (1, 256) but the reference has (1, 4, 8, 8)" and "max_abs" not in flat
    cast = by_id["conv_out_int.mnn::parity[CPU-high]"]["outputs"]["out"]
    assert cast["category"] == "shape_mismatch"
    assert cast["detail"] == "dtype int32 but the reference has float32 (shape (1, 4, 8, 8))"
    result.stdout.fnmatch_lines(["model*CPU-high", "conv_out_flat.mnn*FAIL*shape_mismatch*",
                                 "conv_out_int.mnn*FAIL*shape_mismatch*"])
