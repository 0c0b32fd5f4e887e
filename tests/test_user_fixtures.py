"""Fixtures and markers in a user's own test suite, run as a user would: pytester sessions on real models."""
from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import pytest_mnn_parity

from conftest import read_report, results_by_nodeid

SRC = Path(pytest_mnn_parity.__file__).resolve().parents[1]
UNAVAILABLE_METAL = "METAL: not in this MNN build (session fell back to CPU)"

# A validation "image" and mask for the LaMa-like demo model, as a model repo would load them.
LAMA_INPUTS = '''
import numpy as np

def lama_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((1, 3, 32, 32), dtype=np.float32)
    mask = (rng.random((1, 1, 32, 32)) > 0.7).astype(np.float32)
    return {"image": image, "mask": mask}
'''


def _ids(result) -> list[str]:
    return [line for line in result.outlines if "::" in line and " " not in line]


def test_marker_drives_the_matrix_and_the_command_line_narrows_it(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makepyfile(test_matrix='''
        import pytest

        pytestmark = pytest.mark.mnn_parity(model="lama_like.mnn")

        @pytest.mark.mnn_parity(backends=["CPU", "METAL"], precisions="high,low")
        def test_config(mnn_config):
            assert mnn_config.id == f"{mnn_config.backend}-{mnn_config.precision}"

        @pytest.mark.parametrize("img", ["img1", "img2"])
        @pytest.mark.mnn_parity(backends="CPU", precisions=["low"])
        def test_with_params(img, mnn_config):
            assert mnn_config.threads == 4

        def test_plain():
            pass
    ''')
    ids = _ids(pytester.runpytest("--collect-only", "-q"))
    assert ids == ["test_matrix.py::test_config[CPU-high]", "test_matrix.py::test_config[CPU-low]",
                   "test_matrix.py::test_config[METAL-high]", "test_matrix.py::test_config[METAL-low]",
                   "test_matrix.py::test_with_params[img1-CPU-low]", "test_matrix.py::test_with_params[img2-CPU-low]",
                   "test_matrix.py::test_plain"]
    result = pytester.runpytest("-rs", "--mnn-report", "r.json")
    result.assert_outcomes(passed=5, skipped=2)
    # Skipped with the very reason the generated items give, in the terminal and the report.
    result.stdout.fnmatch_lines([f"SKIPPED ?2? test_matrix.py:*: {UNAVAILABLE_METAL}"])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert set(by_id) == set(ids) - {"test_matrix.py::test_plain"}
    skipped = by_id["test_matrix.py::test_config[METAL-low]"]
    assert (skipped["outcome"], skipped["category"], skipped["message"]) == (
        "skipped", "backend_unavailable", UNAVAILABLE_METAL)
    assert by_id["test_matrix.py::test_with_params[img2-CPU-low]"]["test"] == "test_matrix.py::test_with_params[img2]"

    narrowed = pytester.runpytest("--collect-only", "-q", "--mnn-backends", "CPU", "--mnn-precisions", "low,normal")
    assert _ids(narrowed)[:3] == ["test_matrix.py::test_config[CPU-low]",
                                  "test_matrix.py::test_with_params[img1-CPU-low]",
                                  "test_matrix.py::test_with_params[img2-CPU-low]"]
    nothing = pytester.runpytest("-rs", "--mnn-backends", "VULKAN", "-k", "test_config")
    nothing.assert_outcomes(skipped=1)
    nothing.stdout.fnmatch_lines(["SKIPPED ?1? test_matrix.py:*: the mnn_parity marker asks for backends CPU,METAL "
                                  "but --mnn-backends (or ini mnn_backends) allows only VULKAN: no configuration "
                                  "in common"])


def test_user_test_with_real_inputs_joins_the_matrix_the_report_and_junit(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makepyfile(helpers=LAMA_INPUTS)
    pytester.makepyfile(test_lama='''
        import numpy as np
        import pytest
        from helpers import lama_inputs

        MODELS = []

        @pytest.mark.mnn_parity(model="lama_like.mnn", backends="CPU")
        def test_psnr(mnn_model, mnn_run, mnn_reference, mnn_parity, mnn_config):
            MODELS.append(mnn_model)
            inputs = lama_inputs()
            out = mnn_run(inputs)
            ref = mnn_reference(inputs)
            mse = float(np.mean((out["inpainted"] - ref["inpainted"]) ** 2))
            assert mse == 0 or 10 * np.log10(1.0 / mse) > 60
            result = mnn_parity(out)
            assert result.passed and result.tolerance.tier in ("fp32", "fp16", "bf16")
            assert result.config == mnn_config

        def test_the_model_was_loaded_once():
            assert len(MODELS) == 4 and all(m is MODELS[0] for m in MODELS)
            assert [s.name for s in MODELS[0].info.inputs] == ["image", "mask"]
    ''')
    result = pytester.runpytest("--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU", "--mnn-report", "r.json",
                                "--junitxml", "j.xml")
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines([
        "*MNN parity*",
        "model*CPU-normal*CPU-high*CPU-low*CPU-Low_BF16",
        "test_lama.py::test_psnr*PASS max|d|*PASS*PASS*PASS*",
        "lama_like.mnn*PASS*PASS*PASS*PASS*",
    ])
    report = read_report(pytester.path / "r.json")
    assert report["summary"] == {"passed": 8}
    rec = results_by_nodeid(report)["test_lama.py::test_psnr[CPU-low]"]
    assert (rec["outcome"], rec["category"], rec["checks"], rec["test"]) == ("passed", "ok", 1, "test_lama.py::test_psnr")
    # One tier rule: a user's item and the generated item of the same configuration are held to the same tier,
    # chosen from the same measured arithmetic, on every configuration (no literal: the rule, not its numbers).
    by_id = results_by_nodeid(report)
    for config in ("CPU-normal", "CPU-high", "CPU-low", "CPU-Low_BF16"):
        users, generated = by_id[f"test_lama.py::test_psnr[{config}]"], by_id[f"lama_like.mnn::parity[{config}]"]
        assert users["tolerance"] == generated["tolerance"], config
        assert users["arithmetic"] is not None and users["arithmetic"] == generated["arithmetic"], config
    assert rec["model"] == "lama_like.mnn" and rec["backend_used"] == "CPU"
    assert rec["input_set"].startswith("given by the test (") and rec["reference"].startswith("same model on CPU")
    assert rec["outputs"]["inpainted"]["cosine"] > 0.9999
    props = {}
    for case in ET.parse(pytester.path / "j.xml").iter("testcase"):
        props[case.get("name")] = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["test_psnr[CPU-high]"]["mnn_category"] == "ok" and props["test_psnr[CPU-high]"]["mnn_tier"] == "fp32"
    assert float(props["test_psnr[CPU-high]"]["mnn_inpainted_cosine"]) > 0.9999


def test_a_collapse_fails_with_the_layer_to_blame_and_a_reproduce_command_that_reproduces(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    pytester.makepyfile(test_zero='''
        import numpy as np
        import pytest

        @pytest.mark.mnn_parity(model="zero.fp16.mnn", reference="zero.mnn", backends="CPU", precisions="high")
        def test_denoise(mnn_run, mnn_parity):
            out = mnn_run(np.full((1, 3, 8, 8), 0.5, np.float32))
            mnn_parity(out)
    ''')
    result = pytester.runpytest("--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * zero_output on CPU-high: output 'out': every element is exactly 0*",
        "E * reference: zero.mnn on CPU high, 4 threads",
        "E * inputs:    given by the test (*) - image 1x3x8x8 float32",
        "E * first divergent layer: tiny_conv (Convolution, #1) ?zero?; its inputs were within tolerance",
        "E * reproduce: pytest 'test_zero.py::test_denoise?CPU-high?'",
        "FAILED test_zero.py::test_denoise?CPU-high? - ParityCheckFailed: zero_output*",
    ])
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert (rec["outcome"], rec["category"]) == ("failed", "zero_output")
    assert rec["first_divergent_layer"]["name"] == "tiny_conv" and rec["layer_trace"]["compared"] == 4
    assert [r["kind"] for r in rec["fp16_risks"]] == ["underflow"]
    assert rec["message"].startswith("zero_output on CPU-high")
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines if "reproduce: " in line)
    again = pytester.runpytest(*shlex.split(command)[1:])
    again.assert_outcomes(failed=1)
    assert "zero_output on CPU-high" in again.stdout.str()


def test_tolerances_resolve_builtin_ini_marker_call_then_command_line(pytester, models):
    models("collapse/healthy.fp16.mnn", "collapse/healthy.mnn")
    pytester.makepyfile(test_tol='''
        import numpy as np
        import pytest

        pytestmark = pytest.mark.mnn_parity(model="healthy.fp16.mnn", reference="healthy.mnn", backends="CPU",
                                            precisions="high")
        IMAGE = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)

        def test_builtin(mnn_run, mnn_parity):
            mnn_parity(mnn_run(IMAGE))

        @pytest.mark.mnn_parity(atol=0.01, rtol=0.01)
        def test_marker(mnn_run, mnn_parity):
            mnn_parity(mnn_run(IMAGE))

        def test_call(mnn_run, mnn_parity):
            result = mnn_parity(mnn_run(IMAGE), atol=0.01, rtol=0.01)
            assert result.tolerance.sources == ("mnn_parity call",)

        def test_not_failing(mnn_run, mnn_parity):
            result = mnn_parity(mnn_run(IMAGE), fail=False)
            assert result.category.value == "mismatch"
    ''')
    result = pytester.runpytest("--mnn-report", "r.json")
    result.assert_outcomes(passed=3, failed=1)
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert by_id["test_tol.py::test_builtin[CPU-high]"]["category"] == "mismatch"
    assert by_id["test_tol.py::test_marker[CPU-high]"]["tolerance"]["sources"] == ["marker mnn_parity"]
    assert by_id["test_tol.py::test_marker[CPU-high]"]["tolerance"]["atol"] == 0.01
    # Passed, because the test asked not to fail, but the record says what was found.
    assert (by_id["test_tol.py::test_not_failing[CPU-high]"]["outcome"],
            by_id["test_tol.py::test_not_failing[CPU-high]"]["category"]) == ("passed", "mismatch")

    pytester.makeini("[pytest]\nmnn_atol = 0.5\n")
    strict = pytester.runpytest("--mnn-atol", "0", "--mnn-rtol", "0", "--mnn-report", "r.json", "-k", "marker")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*tier fp32 (overridden by ini, marker mnn_parity, command line): atol 0 x*",
                                 "*reproduce: pytest 'test_tol.py::test_marker?CPU-high?' --mnn-atol 0 --mnn-rtol 0"])


def test_mnn_xfail_and_mnn_requires_backend(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    pytester.makepyfile(test_marks='''
        import numpy as np
        import pytest

        pytestmark = pytest.mark.mnn_parity(model="zero.fp16.mnn", reference="zero.mnn", backends="CPU",
                                            precisions=["high", "low"])

        @pytest.mark.mnn_xfail(precision="low", reason="fp16 weights flush to zero, issue 12")
        def test_known_bad_on_low(mnn_run, mnn_parity):
            mnn_parity(mnn_run(np.ones((1, 3, 8, 8), np.float32)))

        @pytest.mark.mnn_xfail(backend="CPU", precision=["high", "low"], reason="not yet", strict=True)
        def test_strict(mnn_config):
            pass

        @pytest.mark.mnn_requires_backend("METAL")
        def test_needs_opencl():
            pass

        @pytest.mark.mnn_requires_backend("CPU")
        def test_needs_cpu():
            pass
    ''')
    result = pytester.runpytest("-rsx", "--strict-markers", "--mnn-report", "r.json")  # the markers are registered
    result.assert_outcomes(failed=3, xfailed=1, passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED ?1? test_marks.py:*: {UNAVAILABLE_METAL}",
                                 "XFAIL test_marks.py::test_known_bad_on_low?CPU-low? - fp16 weights flush to zero*"])
    result.stdout.fnmatch_lines(["*test_marks.py::test_known_bad_on_low  FAIL zero_output*XFAILED zero_output*"])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert (by_id["test_marks.py::test_known_bad_on_low[CPU-low]"]["outcome"],
            by_id["test_marks.py::test_known_bad_on_low[CPU-low]"]["category"]) == ("xfailed", "zero_output")
    assert by_id["test_marks.py::test_strict[CPU-high]"]["outcome"] == "failed"  # XPASS(strict)


def test_bad_input_and_broken_models_fail_specifically_and_the_rest_still_runs(pytester, models):
    models("demo/lama_like.mnn", "control_flow/if_branch.mnn")
    pytester.makepyfile(helpers=LAMA_INPUTS)
    pytester.makepyfile(test_errors='''
        import numpy as np
        import pytest
        from helpers import lama_inputs
        from pytest_mnn_parity.engine.user_inputs import MnnInputError

        pytestmark = pytest.mark.mnn_parity(backends="CPU", precisions="high")

        @pytest.mark.mnn_parity(model="models/missing.mnn")
        def test_missing_model(mnn_run):
            pass

        @pytest.mark.mnn_parity(model="if_branch.mnn")
        def test_control_flow(mnn_run):
            mnn_run(np.ones((1, 3, 8, 8), np.float32))

        @pytest.mark.mnn_parity(model="lama_like.mnn")
        def test_bad_inputs(mnn_run):
            inputs = lama_inputs()
            with pytest.raises(MnnInputError, match=r"missing input\\(s\\) \\['mask'\\].*image 1x3x32x32 float32"):
                mnn_run({"image": inputs["image"]})
            with pytest.raises(MnnInputError, match=r"'image' has shape 1x3x64x64 .* --mnn-input-shape image=1x3x64x64"):
                mnn_run({**inputs, "image": np.zeros((1, 3, 64, 64), np.float32)})
            with pytest.raises(MnnInputError, match="one array but the model has 2 inputs"):
                mnn_run(inputs["image"])

        def test_no_model(mnn_run):
            pass

        @pytest.mark.mnn_parity(model="lama_like.mnn")
        def test_good(mnn_run, mnn_parity):
            mnn_parity(mnn_run(lama_inputs()))
    ''')
    pytester.makepyfile(test_typo='''
        import pytest

        @pytest.mark.mnn_parity(model="lama_like.mnn", atoll=0.1)
        def test_typo(mnn_config):
            pass
    ''')
    result = pytester.runpytest("--mnn-report", "r.json")
    result.assert_outcomes(passed=2, failed=1, errors=3)
    result.stdout.fnmatch_lines([
        "models/missing.mnn: no such file",
        "*fix: paths in @pytest.mark.mnn_parity(model=..., reference=...) are relative to the test file's directory",
        "test_errors.py::test_no_model?CPU-high? uses mnn_config, mnn_model, mnn_run but names no model: add "
        "@pytest.mark.mnn_parity(model=*",
        "@pytest.mark.mnn_parity on test_typo.py::test_typo: unknown argument(s) ?'atoll'?; known: model, *",
        "*runSession returned 3 (COMPUTE_SIZE_ERROR)*",
    ])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert {k: (v["outcome"], v["category"]) for k, v in by_id.items()} == {
        "test_errors.py::test_missing_model[CPU-high]": ("error", "model_error"),
        "test_errors.py::test_control_flow[CPU-high]": ("failed", "runtime_error"),
        "test_errors.py::test_bad_inputs[CPU-high]": ("passed", "ok"),
        "test_errors.py::test_no_model[CPU-high]": ("error", "model_error"),
        "test_errors.py::test_good[CPU-high]": ("passed", "ok"),
    }
    assert "COMPUTE_SIZE_ERROR" in by_id["test_errors.py::test_control_flow[CPU-high]"]["message"]


def test_without_a_marker_the_models_come_from_mnn_model(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn", "collapse/healthy.mnn")
    pytester.makepyfile(test_cli='''
        import numpy as np

        def test_runs(mnn_run, mnn_parity):
            mnn_parity(mnn_run(np.ones((1, 3, 8, 8), np.float32)))

        def test_model_only(mnn_model):
            assert mnn_model.info.output_names == ("out",)
    ''')
    base = ["-m", "not mnn_generated", "--mnn-backends", "CPU", "--mnn-precisions", "high"]
    one = pytester.runpytest(*base, "--mnn-model", "healthy.mnn", "--collect-only", "-q")
    assert _ids(one) == ["test_cli.py::test_runs[CPU-high]", "test_cli.py::test_model_only"]
    two = pytester.runpytest(*base, "--mnn-model", "healthy.mnn", "--mnn-model", "zero.fp16.mnn", "-v")
    # zero.fp16.mnn against itself: both sides all zeros, so the check tested nothing (degenerate_reference).
    two.assert_outcomes(passed=3, failed=1)
    two.stdout.fnmatch_lines(["test_cli.py::test_runs?healthy.mnn-CPU-high? PASSED*",
                              "test_cli.py::test_runs?zero.fp16.mnn-CPU-high? FAILED*",
                              "test_cli.py::test_model_only?healthy.mnn? PASSED*",
                              "test_cli.py::test_model_only?zero.fp16.mnn? PASSED*",
                              "*degenerate_reference on CPU-high: the reference's outputs are degenerate*'out' all zeros*",
                              "test_cli.py::test_runs?healthy.mnn? *PASS*",
                              "test_cli.py::test_runs?zero.fp16.mnn? *FAIL degenerate_reference*"])
    # --mnn-reference is the reference of the --mnn-model models, in user tests too.
    against_fp32 = pytester.runpytest(*base, "--mnn-model", "zero.fp16.mnn", "--mnn-reference", "zero.mnn")
    against_fp32.assert_outcomes(passed=1, failed=1)
    against_fp32.stdout.fnmatch_lines([
        "*reference: zero.mnn on CPU high, 4 threads",
        "*reproduce: pytest 'test_cli.py::test_runs?CPU-high?' --mnn-model zero.fp16.mnn -m 'not mnn_generated' "
        "--mnn-reference zero.mnn",
    ])
    command = next(line.split("reproduce: ", 1)[1] for line in against_fp32.outlines if "reproduce: " in line)
    pytester.runpytest(*shlex.split(command)[1:]).assert_outcomes(failed=1)


def test_xdist_two_workers_give_the_same_ids_and_one_merged_report(pytester, models, monkeypatch):
    pytest.importorskip("xdist")
    # The subprocess must load this plugin, not whichever copy a relative PYTHONPATH finds from its cwd.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    models("demo/lama_like.mnn", "collapse/zero.fp16.mnn", "collapse/zero.mnn")
    pytester.makepyfile(helpers=LAMA_INPUTS)
    pytester.makepyfile(test_workers='''
        import numpy as np
        import pytest
        from helpers import lama_inputs

        @pytest.mark.mnn_parity(model="lama_like.mnn")
        def test_lama(mnn_run, mnn_parity):
            mnn_parity(mnn_run(lama_inputs()))

        @pytest.mark.mnn_parity(model="zero.fp16.mnn", reference="zero.mnn", precisions="high,low")
        @pytest.mark.mnn_xfail(precision="low", reason="known")
        def test_zero(mnn_run, mnn_parity):
            mnn_parity(mnn_run(np.ones((1, 3, 8, 8), np.float32)))
    ''')
    args = ["--mnn-backends", "CPU,METAL", "--mnn-model", "lama_like.mnn"]
    single = pytester.runpytest(*args, "--mnn-report", "single.json")
    parallel = pytester.runpytest_subprocess(*args, "-n", "2", "--mnn-report", "parallel.json")
    for result in (single, parallel):
        result.assert_outcomes(passed=8, failed=1, xfailed=1, skipped=10)
        # Rows come in the order results arrive, which differs between workers and runs.
        for row in ("test_workers.py::test_lama *PASS*", "test_workers.py::test_zero *FAIL zero_output*",
                    "lama_like.mnn *PASS*"):
            result.stdout.fnmatch_lines(["*MNN parity*", row])
    one = results_by_nodeid(read_report(pytester.path / "single.json"))
    two = results_by_nodeid(read_report(pytester.path / "parallel.json"))
    assert one.keys() == two.keys() and len(one) == 20
    for nodeid, rec in one.items():
        other = two[nodeid]
        assert (rec["outcome"], rec["category"], rec.get("test"), rec["outputs"].keys()) == (
            other["outcome"], other["category"], other.get("test"), other["outputs"].keys())
    assert two["test_workers.py::test_zero[CPU-high]"]["first_divergent_layer"]["name"] == "tiny_conv"
