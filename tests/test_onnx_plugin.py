"""ONNX models through the plugin, as a user runs them: pytester sessions on the real ONNX fixtures."""
from __future__ import annotations

import shlex
import shutil
import sys

import pytest

from pytest_mnn_parity.onnx.variants import ConversionCache

from conftest import read_report, results_by_nodeid

CPU_HIGH = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high")


def test_variant_ids_matrix_rows_and_report_field(pytester, models):
    models("onnx/collapse_healthy.onnx")
    args = ["--mnn-only", "--mnn-backends", "CPU,METAL", "--mnn-precisions", "high,low", "--mnn-model",
            "collapse_healthy.onnx"]
    ids = [line for line in pytester.runpytest(*args, "--collect-only", "-q").outlines if "::" in line]
    assert ids[:4] == [f"collapse_healthy.onnx::parity[fp32-{c}]" for c in ("CPU-high", "CPU-low", "METAL-high",
                                                                             "METAL-low")]
    assert len(ids) == 8 and "collapse_healthy.onnx::parity[fp16-CPU-low]" in ids
    result = pytester.runpytest(*args, "--mnn-report", "r.json")
    result.assert_outcomes(passed=4, skipped=4)
    result.stdout.fnmatch_lines(["model*CPU-high*CPU-low",
                                 "collapse_healthy.onnx [[]fp32]*PASS*PASS*",
                                 "collapse_healthy.onnx [[]fp16]*PASS*PASS*"])
    report = read_report(pytester.path / "r.json")
    assert report["settings"]["convert"] == ["fp32", "fp16"]
    by_id = results_by_nodeid(report)
    rec = by_id["collapse_healthy.onnx::parity[fp16-CPU-high]"]
    assert rec["variant"] == "fp16" and rec["tolerance"]["tier"] == "fp16"
    assert rec["reference"].startswith("ONNX Runtime") and rec["outcome"] == "passed"
    assert by_id["collapse_healthy.onnx::parity[fp16-METAL-low]"]["variant"] == "fp16"  # skipped ones too
    assert list((pytester.path / ".pytest_cache" / "d" / "mnn-parity-convert").glob("*.mnn"))  # cached
    pytester.runpytest(*args, "-k", "fp16 and CPU").assert_outcomes(passed=2, deselected=6)
    int8 = pytester.runpytest(*args, "--mnn-convert", "int8", "--mnn-backends", "CPU", "--mnn-report", "i.json")
    int8.assert_outcomes(passed=2)
    assert {r["variant"] for r in read_report(pytester.path / "i.json")["results"]} == {"int8"}


def test_fp16_collapse_is_localised_and_the_reproduce_command_reruns_that_variant(pytester, models):
    models("onnx/fused_conv_relu.onnx")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-model", "fused_conv_relu.onnx", "--mnn-report", "r.json")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "zero_output on CPU-high: output 'out'" in text
    assert "first divergent layer: tiny_conv (Conv, #2) [zero]; its inputs were within tolerance" in text
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["fused_conv_relu.onnx::parity[fp16-CPU-high]"]
    assert rec["first_divergent_layer"]["name"] == "tiny_conv" and rec["first_divergent_layer"]["type"] == "Conv"
    assert rec["layer_trace"]["compared"] == 4 and "re-converted" in rec["layer_trace"]["method"]
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines if "reproduce: " in line)
    assert "--mnn-convert fp16" in command
    again = pytester.runpytest(*shlex.split(command)[1:])
    again.assert_outcomes(failed=1)  # the fp16 variant only
    assert "first divergent layer: tiny_conv" in again.stdout.str()


def test_unconvertible_models_are_errors_and_the_others_still_run(pytester, models):
    models("onnx/unsupported_dft.onnx", "onnx/converter_crash.onnx", "onnx/collapse_healthy.onnx")
    args = [*CPU_HIGH, "--mnn-convert", "fp16", "--mnn-report", "r.json"]
    for name in ("unsupported_dft.onnx", "converter_crash.onnx", "collapse_healthy.onnx"):
        args += ["--mnn-model", name]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    assert "unsupported_dft.onnx: MNN cannot convert it (variant fp16: MNNConvert --fp16): unsupported ONNX " \
           "operator(s) DFT (opset 17)" in text
    assert "fix: DFT: write the FFT as MatMul with DFT matrices" in text
    assert "converter_crash.onnx: MNN cannot convert it" in text
    assert "Traceback" not in text and "_pytest/runner.py" not in text  # the message, not pytest's stack
    outcomes = {r["model"]: (r["outcome"], r["category"], r["variant"])
                for r in read_report(pytester.path / "r.json")["results"]}
    assert outcomes == {"unsupported_dft.onnx": ("error", "model_error", "fp16"),
                        "converter_crash.onnx": ("error", "model_error", "fp16"),
                        "collapse_healthy.onnx": ("passed", "ok", "fp16")}


def test_mnn_model_against_onnx_reference_and_directories_pick_up_onnx(pytester, models):
    (pytester.path / "zoo").mkdir()
    models("collapse/healthy.mnn", rename="zoo/healthy.mnn")
    models("onnx/collapse_healthy.onnx", rename="zoo/collapse_healthy.onnx")
    ids = pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo", "--collect-only", "-q").outlines
    assert {"zoo/healthy.mnn::parity[CPU-high]", "zoo/collapse_healthy.onnx::parity[fp32-CPU-high]",
            "zoo/collapse_healthy.onnx::parity[fp16-CPU-high]"} <= set(ids)
    models("collapse/zero.fp16.mnn", "onnx/collapse_zero.onnx")
    ok = pytester.runpytest(*CPU_HIGH, "--mnn-model", "zoo/healthy.mnn", "--mnn-reference",
                            "zoo/collapse_healthy.onnx", "--mnn-report", "r.json")
    ok.assert_outcomes(passed=1)
    assert read_report(pytester.path / "r.json")["results"][0]["reference"].startswith("ONNX Runtime")
    bad = pytester.runpytest(*CPU_HIGH, "--mnn-model", "zero.fp16.mnn", "--mnn-reference", "collapse_zero.onnx")
    bad.assert_outcomes(failed=1)
    assert "zero_output on CPU-high" in bad.stdout.str()


def test_extra_converter_flags_from_the_ini_key_reach_the_converter(pytester, models):
    models("onnx/collapse_healthy.onnx")
    pytester.makeini("[pytest]\nmnn_convert_flags = --weightQuantAsymmetric\n")
    result = pytester.runpytest(*CPU_HIGH, "--mnn-convert", "int8", "--mnn-model", "collapse_healthy.onnx",
                                "--mnn-report", "r.json")
    result.assert_outcomes(passed=1)
    assert read_report(pytester.path / "r.json")["settings"]["convert_flags"] == ["--weightQuantAsymmetric"]
    folder = pytester.path / ".pytest_cache" / "d" / "mnn-parity-convert"
    expected = ConversionCache(folder).path_for(pytester.path / "collapse_healthy.onnx",
                                                ("--weightQuantBits", "8", "--weightQuantAsymmetric"), "int8")
    # (the fp32 conversion next to it feeds the fp16 risk scan)
    assert expected.name in [p.name for p in folder.glob("*.int8.*.mnn")]


@pytest.mark.parametrize(("args", "ini", "message"), [
    (["--mnn-convert", "int4"], "",
     "--mnn-convert: unknown conversion variant 'int4' (did you mean 'int8'?); known: fp32, fp16, int8"),
    ([], "mnn_convert_flags = --fp16", "mnn_convert_flags: '--fp16' is set by pytest-mnn-parity itself"),
])
def test_bad_conversion_options_are_usage_errors(pytester, args, ini, message):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.onnx", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


_AUDIT = '''
import os, sys
_LOG = os.environ["MNN_PARITY_NET_LOG"]
_NET = ("socket.__new__", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
        "socket.bind", "http.client.connect", "urllib.Request")
with open(_LOG, "a") as f:
    f.write(f"start {os.getpid()} {sys.argv[:2]!r}\\n")
def _hook(event, args):
    if event in _NET:
        with open(_LOG, "a") as f:
            f.write(f"NET {event} {args!r}\\n")
sys.addaudithook(_hook)
'''


def test_the_whole_run_opens_no_network_connection(pytester, models, tmp_path, monkeypatch):
    """Every Python process of the run (pytest and each converter child) is audited for socket use;
    with strace available, every process, native code included, is traced for inet sockets."""
    models("onnx/fused_conv_relu.onnx", "onnx/unsupported_dft.onnx")
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_AUDIT)
    log = tmp_path / "net.log"
    monkeypatch.setenv("MNN_PARITY_NET_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", f"{hook_dir}:{':'.join(sys.path)}")
    argv = [*CPU_HIGH, "--mnn-model", "fused_conv_relu.onnx", "--mnn-model", "unsupported_dft.onnx",
            "-p", "no:cacheprovider"]
    strace = shutil.which("strace")
    trace = tmp_path / "strace.txt"
    if strace:
        result = pytester.run(strace, "-f", "-qq", "-e", "trace=socket,connect,execve", "-o", str(trace),
                              sys.executable, "-m", "pytest", *argv, timeout=300)
    else:  # pragma: no cover - CI images without strace still get the audit hook
        result = pytester.run(sys.executable, "-m", "pytest", *argv, timeout=300)
    assert "1 failed, 1 passed, 2 errors" in result.stdout.str()  # conversion, ORT and localisation all ran
    lines = log.read_text().splitlines()
    starts = [line for line in lines if line.startswith("start ")]
    assert any("'-m'" in line for line in starts) and any("'-c'" in line for line in starts)  # converter children
    assert [line for line in lines if line.startswith("NET ")] == []
    if strace:
        traced = trace.read_text().splitlines()
        assert any("execve(" in line and '"-c"' in line for line in traced)  # converter children were followed
        inet = [line for line in traced if "AF_INET" in line]
        assert inet == [], inet[:5]
