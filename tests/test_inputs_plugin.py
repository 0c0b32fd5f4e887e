"""Sidecars, input sets, xfail and the search through real pytest sessions (pytester) on real models."""
from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
from PIL import Image

from conftest import read_report, results_by_nodeid

CPU = ("--mnn-only", "--mnn-backends", "CPU")
TWO_SETS = """
[input_sets.photo1]
image = { image = "pics/photo1.png" }
mask = { mask = "pics/mask1.png" }

[input_sets.photo2]
image = { image = "pics/photo2.png", color = "BGR", mean = 0.5, std = 0.5 }
mask = { mask = "pics/mask2.png", threshold = 0.3 }
"""


@pytest.fixture
def lama(pytester, models):
    """The LaMa-like demo with two real PNG photos and masks written by Pillow."""
    models("demo/lama_like.mnn", rename="lama.mnn")
    pics = pytester.path / "pics"
    pics.mkdir()
    y, x = np.mgrid[0:40, 0:48]
    photo = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(photo).save(pics / "photo1.png")
    Image.fromarray(photo[::-1, ::-1].copy()).save(pics / "photo2.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 10:24] = 255
    Image.fromarray(mask).save(pics / "mask1.png")
    Image.fromarray((mask.T // 2).copy()).save(pics / "mask2.png")  # 127: masked only at threshold 0.3
    return pytester.path / "lama.mnn"


def test_each_input_set_is_a_param_id_and_the_report_input_set(pytester, lama):
    (pytester.path / "lama.mnn.toml").write_text(TWO_SETS)
    ids = pytester.runpytest(*CPU, "--mnn-model", "lama.mnn", "--collect-only", "-q").outlines
    assert "lama.mnn::parity[photo1-CPU-low]" in ids and "lama.mnn::parity[photo2-CPU-Low_BF16]" in ids
    assert not any("parity[CPU-" in line for line in ids)  # declared sets replace the seeded inputs
    result = pytester.runpytest(*CPU, "--mnn-model", "lama.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["lama.mnn [[]photo1[]]  PASS*", "lama.mnn [[]photo2[]]  PASS*"])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    assert by_id["lama.mnn::parity[photo2-CPU-high]"]["input_set"] == "photo2"
    only = pytester.runpytest(*CPU, "--mnn-model", "lama.mnn", "--mnn-input-sets", "photo2", "-q")
    only.assert_outcomes(passed=4)


def test_pyproject_table_works_like_a_sidecar_file(pytester, lama):
    table = TWO_SETS.replace("[input_sets.", '[tool.mnn-parity.models."lama.mnn".input_sets.')
    pytester.makepyprojecttoml(table + '\n[tool.mnn-parity.models."lama.mnn".tolerance.outputs.inpainted]\n'
                                       "min_cosine = 0.99999\n")
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "lama.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["lama.mnn::parity[photo1-CPU-high]"]
    assert rec["outputs"]["inpainted"]["tolerance"]["min_cosine"] == 0.99999
    assert rec["outputs"]["inpainted"]["tolerance"]["sources"] == ["sidecar pyproject.toml outputs.inpainted"]


def test_declared_xfail_is_strict_and_reported(pytester, models):
    models("threshold/gate.fp16.mnn", "threshold/gate.mnn", "threshold/dark.png", "threshold/small_mask.png")
    (pytester.path / "gate.fp16.mnn.toml").write_text("""
[input_sets.dark]
image = { image = "dark.png" }
mask = { mask = "small_mask.png" }

[input_sets.white]
image = { generator = "constant", value = 1.0 }
mask = { generator = "zeros" }

[[xfail]]
input_set = "white"
reason = "the fp16 build clamps its 65536 gain: bright images go black"

[[xfail]]
input_set = "dark"
precision = "low"
reason = "wrongly expected to fail"
""")
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high,low", "--mnn-model", "gate.fp16.mnn",
                                "--mnn-reference", "gate.mnn", "--mnn-report", "r.json", "-rxX")
    result.assert_outcomes(passed=1, xfailed=2, failed=1)
    result.stdout.fnmatch_lines(["*_ gate.fp16.mnn::parity[[]dark-CPU-low[]] (MNN parity) _*",
                                 "[[]XPASS(strict)[]] gate.fp16.mnn.toml: wrongly expected to fail",
                                 "gate.fp16.mnn [[]white[]]  XFAILED zero_output*XFAILED zero_output*",
                                 "XFAIL*parity[[]white-CPU-high[]]*gate.fp16.mnn.toml: the fp16 build clamps*"])
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    white = by_id["gate.fp16.mnn::parity[white-CPU-high]"]
    assert white["outcome"] == "xfailed" and white["category"] == "zero_output"
    xpass = by_id["gate.fp16.mnn::parity[dark-CPU-low]"]
    assert xpass["outcome"] == "xpassed" and "XPASS(strict)" in xpass["message"]
    assert by_id["gate.fp16.mnn::parity[dark-CPU-high]"]["outcome"] == "passed"


def test_bad_sidecars_are_errors_that_stop_nothing_else(pytester, lama, models):
    models("multi_io.mnn")
    (pytester.path / "lama.mnn.toml").write_text(TWO_SETS.replace("pics/photo2.png", "pics/missing.png"))
    args = [*CPU, "--mnn-precisions", "high", "--mnn-model", "lama.mnn", "--mnn-model", "multi_io.mnn",
            "--mnn-report", "r.json"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2, errors=1)  # photo1 and multi_io run; photo2 errors
    result.stdout.fnmatch_lines(["*lama.mnn.toml: [[]input_sets.photo2[]] image: no such image*missing.png",
                                 "*fix: paths are relative to the file that declares them"])
    (pytester.path / "lama.mnn.toml").write_text(TWO_SETS.replace("[input_sets.photo1]", "[input_sets.photo1"))
    broken = pytester.runpytest(*args)
    broken.assert_outcomes(passed=1, errors=1)
    assert "lama.mnn.toml: not valid TOML" in broken.stdout.str()
    report = read_report(pytester.path / "r.json")
    assert {(r["model"], r["outcome"]) for r in report["results"]} == {("lama.mnn", "error"),
                                                                         ("multi_io.mnn", "passed")}
    unknown = pytester.runpytest(*CPU, "--mnn-model", "multi_io.mnn", "--mnn-input-sets", "photo1")
    unknown.assert_outcomes(errors=1)
    assert "--mnn-input-sets photo1: multi_io.mnn declares no input sets" in unknown.stdout.str()


def test_sidecar_shapes_for_a_dynamic_model(pytester, models):
    models("dynamic/dynamic_hw.mnn")
    (pytester.path / "dynamic_hw.mnn.toml").write_text('[shapes]\nimage = "1x3x10x14"\n')
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "dynamic_hw.mnn", "--mnn-report",
                                "r.json")
    result.assert_outcomes(passed=1)
    assert read_report(pytester.path / "r.json")["results"][0]["outputs"]["out"]["shape"] == [1, 8, 10, 14]


def _replay(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("replay:"))
    snippet = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        snippet.append(line[2:])
    then = next(line for line in lines[start:] if line.startswith("then:"))
    return "\n".join(snippet), then.split("then:", 1)[1].strip()


def test_search_finds_saves_and_replays_a_breaking_input(pytester, models):
    models("threshold/gate.fp16.mnn", "threshold/gate.mnn", "threshold/dark.png", "threshold/small_mask.png",
           "threshold/gate.fp16.mnn.toml")
    args = [*CPU, "--mnn-precisions", "high", "--mnn-model", "gate.fp16.mnn", "--mnn-reference", "gate.mnn",
            "--mnn-input-sets", "dark", "--mnn-hypothesis", "20", "--hypothesis-seed", "0"]
    result = pytester.runpytest(*args, "--mnn-report", "r.json")
    result.assert_outcomes(passed=1, failed=1)  # the dark photo passes; the search finds what does not
    text = result.stdout.str()
    assert "zero_output on CPU-high: output 'out'" in text and "search:    found after" in text
    saved = pytester.path / re.search(r"saved:\s+(\S+\.npz)", text).group(1)
    assert saved.is_file() and saved.parent == pytester.path / ".pytest_cache" / "d" / "mnn-parity"
    with np.load(saved) as data:
        assert set(data.files) == {"image", "mask"}
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["gate.fp16.mnn::search[dark-CPU-high]"]
    assert rec["search"]["found"] and rec["search"]["saved"] == str(saved) and rec["category"] == "zero_output"

    snippet, replay = _replay(text)
    with open(pytester.path / "gate.fp16.mnn.toml", "a") as f:
        f.write("\n" + snippet + "\n")
    replayed = pytester.runpytest(*shlex.split(replay)[1:])
    replayed.assert_outcomes(failed=1)
    assert "zero_output on CPU-high: output 'out'" in replayed.stdout.str()
    command = re.search(r"reproduce: (pytest .*--hypothesis-seed 0)", text).group(1)
    reproduced = pytester.runpytest(*shlex.split(command)[1:])
    reproduced.assert_outcomes(passed=1, failed=1)  # --hypothesis-seed: the search finds the same input
    assert re.search(r"saved:\s+(\S+\.npz)", reproduced.stdout.str()).group(1) == str(saved)


def test_search_on_a_healthy_model_passes_with_the_example_count(pytester, models):
    models("multi_io.mnn")
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "multi_io.mnn",
                                "--mnn-hypothesis", "5", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["multi_io.mnn search  PASS * examples"])
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["multi_io.mnn::search[CPU-high]"]
    assert rec["search"]["found"] is False and 1 <= rec["search"]["runs"] <= 5 and rec["search"]["seed"] == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--mnn-hypothesis", "-1"], "--mnn-hypothesis must be 0 (off) or a number of examples"),
    (["--mnn-hypothesis", "many"], "--mnn-hypothesis: expected a number, got 'many'"),
])
def test_bad_search_options_are_usage_errors(pytester, args, message):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_an_onnx_model_sidecar_and_search_against_onnx_runtime(pytester, models):
    """The sidecar of an .onnx model is <name>.onnx.toml; each conversion variant is searched against ORT."""
    models("onnx/threshold_gate.onnx", "threshold/dark.png", "threshold/small_mask.png")
    (pytester.path / "threshold_gate.onnx.toml").write_text(
        '[input_sets.dark]\nimage = { image = "dark.png" }\nmask = { mask = "small_mask.png" }\n')
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "threshold_gate.onnx",
                                "--mnn-convert", "fp32,fp16", "--mnn-hypothesis", "10", "--hypothesis-seed", "0",
                                "--mnn-report", "r.json")
    result.assert_outcomes(passed=3, failed=1)  # only the fp16 conversion breaks, and only past a threshold
    by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
    found = by_id["threshold_gate.onnx::search[fp16-dark-CPU-high]"]
    assert found["category"] == "zero_output" and found["variant"] == "fp16" and found["search"]["found"]
    assert "ONNX Runtime" in found["reference"]
    assert by_id["threshold_gate.onnx::search[fp32-dark-CPU-high]"]["search"]["found"] is False
