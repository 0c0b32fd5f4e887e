"""The pytest layer, exercised as a user would: pytester runs real pytest sessions on real models."""
from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET

import pytest

from conftest import COLLAPSE_CATEGORIES, cpu_wheel_only, read_report, results_by_nodeid

CPU_ONLY = ("--mnn-only", "--mnn-backends", "CPU")


def test_one_item_per_model_backend_precision_with_k_usable_ids(pytester, models):
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "--collect-only", "-q")
    ids = [line for line in result.outlines if "::" in line]
    assert len(ids) == 7 * 4
    assert "lama_like.mnn::parity[CPU-low]" in ids
    assert "lama_like.mnn::parity[OPENCL-Low_BF16]" in ids
    selected = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "-k", "CPU and low", "-q")
    selected.assert_outcomes(passed=2, deselected=26)



@cpu_wheel_only
def test_default_matrix_passes_on_cpu_and_skips_missing_backends_honestly(pytester, models):
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "-rs")
    result.assert_outcomes(passed=4, skipped=24)
    result.stdout.fnmatch_lines([
        "collected 28 items",
        "*MNN parity*",
        "model*CPU-normal*CPU-high*CPU-low*CPU-Low_BF16",
        "lama_like.mnn*PASS*PASS*PASS*PASS*",
        "skipped OPENCL (4 configs): not in this MNN build (session fell back to CPU)",
        "SKIPPED ?4? lama_like.mnn: OPENCL: not in this MNN build (session fell back to CPU)",
    ])
    # MNN's C++ chatter never reaches the user's terminal.
    assert "device supports" not in result.stdout.str()
    assert "Can't Find type" not in result.stdout.str()


def test_json_report_fields(pytester, models):
    models("demo/lama_like.mnn")
    # METAL stands for "a backend this build lacks": no Linux build has it.
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU,METAL", "--mnn-model", "lama_like.mnn",
                                "--mnn-report", "out/report.json")
    result.assert_outcomes(passed=4, skipped=4)
    report = read_report(pytester.path / "out" / "report.json")
    assert report["mnn_version"]
    assert report["backends"]["METAL"]["available"] is False
    assert report["summary"] == {"passed": 4, "skipped": 4}
    by_id = results_by_nodeid(report)
    ok = by_id["lama_like.mnn::parity[CPU-low]"]
    assert ok["model"] == "lama_like.mnn" and ok["backend"] == "CPU" and ok["backend_used"] == "CPU"
    assert ok["precision"] == "low" and ok["variant"] is None and ok["input_set"].startswith("seeded:0")
    assert ok["outcome"] == "passed" and ok["category"] == "ok" and ok["first_divergent_layer"] is None
    metrics = ok["outputs"]["inpainted"]
    for key in ("max_abs", "max_rel", "mean_abs", "rmse", "cosine", "snr_db", "outside_fraction", "worst_index",
                "zero_fraction", "ref_zero_fraction"):
        assert key in metrics
    assert metrics["cosine"] > 0.9999
    assert ok["arithmetic"]["kind"] in ("fp32", "fp16", "bf16", "broken", "unknown")
    assert ok["tolerance"]["tier"] == (ok["arithmetic"]["kind"] if ok["arithmetic"]["kind"] in ("fp32", "fp16", "bf16")
                                       else "fp16")
    skipped = by_id["lama_like.mnn::parity[METAL-high]"]
    assert skipped["outcome"] == "skipped" and skipped["category"] == "backend_unavailable"
    assert skipped["message"] == "METAL: not in this MNN build (session fell back to CPU)"
    assert skipped["backend_used"] is None


@pytest.mark.parametrize("name", ["zero", "partial_zero", "non_finite", "stale"])
def test_collapse_fails_with_category_metrics_and_a_reproduce_command_that_reproduces(pytester, models, name):
    models(f"collapse/{name}.fp16.mnn", f"collapse/{name}.mnn")
    category = COLLAPSE_CATEGORIES[name]
    result = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", f"{name}.fp16.mnn",
                                "--mnn-reference", f"{name}.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert f"{category} on CPU-high: output 'out'" in text
    for part in ("ran on:    CPU (forward type", "reference: " + f"{name}.mnn on CPU high, 4 threads",
                 "tolerance: tier fp32", "max_abs", "worst element"):
        assert part in text
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert rec["outcome"] == "failed" and rec["category"] == category
    assert rec["message"].startswith(category)
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines if "reproduce: " in line)
    argv = shlex.split(command)
    assert argv[0] == "pytest"
    again = pytester.runpytest(*argv[1:])
    again.assert_outcomes(failed=1)
    assert f"{category} on CPU-high" in again.stdout.str()


def test_bad_models_are_errors_and_do_not_stop_the_good_one(pytester, models):
    models("demo/lama_like.mnn")
    (pytester.path / "empty.mnn").write_bytes(b"")
    (pytester.path / "random.mnn").write_bytes(bytes(range(256)) * 4)
    (pytester.path / "truncated.mnn").write_bytes((pytester.path / "lama_like.mnn").read_bytes()[:500])
    (pytester.path / "folder.mnn").mkdir()
    args = [*CPU_ONLY, "--mnn-precisions", "high", "--mnn-report", "r.json"]
    for name in ("missing.mnn", "empty.mnn", "random.mnn", "truncated.mnn", "folder.mnn", "lama_like.mnn"):
        args += ["--mnn-model", name]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, errors=5)
    text = result.stdout.str()
    assert "missing.mnn: no such file" in text
    assert "empty.mnn: is empty (0 bytes)" in text
    assert "random.mnn: MNN cannot load it (flatbuffer verification failed" in text
    assert "truncated.mnn: MNN cannot load it" in text
    assert "folder.mnn: is a directory, not an MNN model file" in text
    report = read_report(pytester.path / "r.json")
    outcomes = {r["model"]: (r["outcome"], r["category"]) for r in report["results"]}
    assert outcomes["lama_like.mnn"] == ("passed", "ok")
    for bad in ("missing.mnn", "empty.mnn", "random.mnn", "truncated.mnn", "folder.mnn"):
        assert outcomes[bad] == ("error", "model_error"), bad
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_directories_and_globs_expand_to_every_model(pytester, models):
    (pytester.path / "zoo" / "nested").mkdir(parents=True)
    models("demo/lama_like.mnn", rename="zoo/a.mnn")
    models("multi_io.mnn", rename="zoo/nested/b.mnn")
    by_dir = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "zoo", "--collect-only", "-q")
    assert {"zoo/a.mnn::parity[CPU-high]", "zoo/nested/b.mnn::parity[CPU-high]"} <= set(by_dir.outlines)
    by_glob = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "zoo/**/*.mnn", "-q")
    by_glob.assert_outcomes(passed=2)
    nothing = pytester.runpytest(*CPU_ONLY, "--mnn-model", "nope/*.mnn", "-q")
    nothing.assert_outcomes(errors=1)
    assert "the pattern matches no file" in nothing.stdout.str()


def test_ini_keys_configure_the_matrix(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makeini("""
        [pytest]
        mnn_model = lama_like.mnn
        mnn_backends = CPU
        mnn_precisions = high, low
        mnn_seed = 3
    """)
    result = pytester.runpytest("--mnn-only", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    report = read_report(pytester.path / "r.json")
    assert report["settings"]["seed"] == 3
    assert {r["precision"] for r in report["results"]} == {"high", "low"}
    cli = pytester.runpytest("--mnn-only", "--mnn-precisions", "normal", "-q")
    cli.assert_outcomes(passed=1)


def test_tolerance_overrides_from_ini_and_command_line(pytester, models):
    models("collapse/healthy.fp16.mnn", "collapse/healthy.mnn")
    base = [*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "healthy.fp16.mnn", "--mnn-reference", "healthy.mnn"]
    pytester.runpytest(*base).assert_outcomes(failed=1)
    pytester.makeini("[pytest]\nmnn_atol = 0.01\nmnn_rtol = 0.01\n")
    loose = pytester.runpytest(*base, "--mnn-report", "r.json")
    loose.assert_outcomes(passed=1)
    tol = read_report(pytester.path / "r.json")["results"][0]["tolerance"]
    assert tol["atol"] == 0.01 and tol["sources"] == ["ini"]
    strict = pytester.runpytest(*base, "--mnn-atol", "0", "--mnn-rtol", "0")
    strict.assert_outcomes(failed=1)
    assert "overridden by ini, command line" in strict.stdout.str()


def test_input_shape_option_for_dynamic_models(pytester, models):
    models("dynamic/dynamic_hw.mnn")
    missing = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "dynamic_hw.mnn")
    missing.assert_outcomes(errors=1)
    missing.stdout.fnmatch_lines(["*input 'image' has dynamic shape*", "*--mnn-input-shape image=1x3x{H}x{W}*"])
    assert "_pytest/runner.py" not in missing.stdout.str()  # the reason, not pytest's own call stack
    given = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "dynamic_hw.mnn",
                               "--mnn-input-shape", "image=1x3x12x20")
    given.assert_outcomes(passed=1)


@pytest.mark.parametrize(("args", "message"), [
    (["--mnn-backends", "OPENCLL"], "unknown MNN backend 'OPENCLL'"),
    (["--mnn-precisions", "fp16"], "unknown MNN precision 'fp16'"),
    (["--mnn-input-shape", "image=1xAx3"], "expected NAME=DIMxDIMx"),
    (["--mnn-seed", "abc"], "--mnn-seed: expected a number"),
    (["--mnn-threads", "0"], "--mnn-threads must be at least 1"),
])
def test_bad_options_are_usage_errors(pytester, args, message):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_unwritable_report_path_fails_at_start_up(pytester, models):
    models("demo/lama_like.mnn")
    blocker = pytester.path / "ro"
    blocker.mkdir()
    blocker.chmod(0o500)
    try:
        result = pytester.runpytest(*CPU_ONLY, "--mnn-model", "lama_like.mnn", "--mnn-report", "ro/sub/r.json")
    finally:
        blocker.chmod(0o700)
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; the permission check cannot trigger")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # pragma: no cover


def test_junit_xml_carries_metrics_as_properties(pytester, models):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "zero.fp16.mnn",
                       "--mnn-reference", "zero.mnn", "--junitxml", "j.xml")
    tree = ET.parse(pytester.path / "j.xml")
    props = {p.get("name"): p.get("value") for p in tree.iter("property")}
    assert props["mnn_category"] == "zero_output"
    assert props["mnn_backend_used"] == "CPU" and props["mnn_tier"] == "fp32"
    assert float(props["mnn_out_zero_fraction"]) == 1.0 and float(props["mnn_out_cosine"]) == 0.0


def test_mnn_only_skips_test_files_and_without_it_both_run(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makepyfile(test_user="def test_user():\n    assert 1 + 1 == 2\n")
    both = pytester.runpytest("--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU", "--mnn-precisions", "high")
    both.assert_outcomes(passed=2)
    only = pytester.runpytest(*CPU_ONLY, "--mnn-model", "lama_like.mnn", "--mnn-precisions", "high")
    only.assert_outcomes(passed=1)


def test_without_mnn_model_the_plugin_stays_silent(pytester):
    pytester.makepyfile(test_user="def test_user():\n    pass\n")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
    assert "MNN parity" not in result.stdout.str() and "device supports" not in result.stdout.str()


def test_runtime_error_item_for_a_model_sessions_cannot_run(pytester, models):
    models("control_flow/if_branch.mnn")
    result = pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "if_branch.mnn",
                                "--mnn-api", "session")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*runtime_error on CPU-high: runSession returned 3 (COMPUTE_SIZE_ERROR)*",
                                 "*hint: *Module API*"])


@pytest.mark.parametrize("dist", ["load", "loadgroup"])
def test_xdist_gives_the_same_ids_and_one_merged_report(pytester, models, dist):
    pytest.importorskip("xdist")
    from test_reports import parse_html

    models("demo/lama_like.mnn", "multi_io.mnn")
    args = ["--mnn-only", "--mnn-backends", "CPU,METAL", "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn",
            "--mnn-artifacts", "art", "--mnn-artifacts-when", "always"]
    # Under loadgroup, -k must still select by the plain ids xdist decorates with "@<group>".
    selection = ["-k", "not normal"] if dist == "loadgroup" else []
    n = 12 if selection else 16
    single = pytester.runpytest(*args, *selection, "--mnn-report", "single.json", "--mnn-html", "single.html")
    parallel = pytester.runpytest_subprocess(*args, *selection, "-n", "2", "--dist", dist, "--mnn-report",
                                             "parallel.json", "--mnn-html", "parallel.html", "-v")
    parallel.assert_outcomes(passed=n // 2, skipped=n // 2)
    one = results_by_nodeid(read_report(pytester.path / "single.json"))
    two = results_by_nodeid(read_report(pytester.path / "parallel.json"))
    assert one.keys() == two.keys() and len(one) == n
    for nodeid, rec in one.items():
        # Everything but the timing and the process that ran it (pid, peak RSS): metrics, messages, layers, pictures.
        assert {k: v for k, v in rec.items() if k not in ("seconds", "worker", "process")} == {
            k: v for k, v in two[nodeid].items() if k not in ("seconds", "worker", "process")}
    assert "MNN parity" in parallel.stdout.str()
    single.assert_outcomes(passed=n // 2, skipped=n // 2, deselected=16 - n)
    html_one, html_two = (parse_html((pytester.path / f"{name}.html").read_text()) for name in ("single", "parallel"))
    assert html_one.rows == html_two.rows == ["lama_like.mnn", "multi_io.mnn"]
    assert html_one.cells == html_two.cells and len(html_one.cells) == n // 2
    assert len(html_one.images) == len(html_two.images) > 0
    if dist == "loadgroup":
        # xdist shows ids with "@<model>" and sends each model's items to one worker; reports keep the plain ids.
        ran = [line.split() for line in parallel.outlines if "PASSED" in line and line.startswith("[gw")]
        workers = {}
        for worker, *_, shown in ran:
            # pytest's -v line turns the dot of "x.mnn" into "::" (it expects dotted
            # Python names) and, depending on the pytest version, shows xdist's
            # "@group" suffix; the model is what matters here.
            model = shown.split("@")[0].replace("::mnn::", ".mnn::").split("::")[0]
            workers.setdefault(model, set()).add(worker)
        assert set(workers) == {"lama_like.mnn", "multi_io.mnn"} and all(len(w) == 1 for w in workers.values())
        assert not any("@" in nodeid for nodeid in two)
        assert not any("normal" in nodeid for nodeid in two)


def test_report_is_valid_json_even_with_infinities(pytester, models):
    models("collapse/non_finite.fp16.mnn", "collapse/non_finite.mnn")
    pytester.runpytest(*CPU_ONLY, "--mnn-precisions", "high", "--mnn-model", "non_finite.fp16.mnn",
                       "--mnn-reference", "non_finite.mnn", "--mnn-report", "r.json")
    text = (pytester.path / "r.json").read_text()
    json.loads(text)  # strict parse: NaN/Infinity would be rejected by other tools
    import re

    assert not re.search(r":\s*-?(NaN|Infinity)\b", text)
    rec = json.loads(text)["results"][0]
    assert rec["category"] == "non_finite" and rec["outputs"]["out"]["worst_target"] == "-inf"
