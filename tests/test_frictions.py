"""What a new user trips over (issue 21): ids that paste back, names that must exist, errors said once.

Each test runs pytest with the plugin on real fixture models and checks what the user sees.
"""
from __future__ import annotations

import re
from xml.etree import ElementTree

import pytest

from conftest import read_report

CPU = ("--mnn-backends", "CPU")


def _ids(result, word: str) -> list[str]:
    return [line.split(f" {word}")[0] for line in result.outlines if f" {word}" in line and "::" in line
            and not line.startswith(word)]


@pytest.mark.parametrize("only", [True, False])
def test_every_id_the_plugin_prints_runs_that_item_when_pasted(pytester, models, only):
    models("demo/lama_like.mnn", "collapse/zero.fp16.mnn", "collapse/zero.mnn")
    base = ["--mnn-only"] if only else []
    first = pytester.runpytest(*base, *CPU, "--mnn-precisions", "high,low", "--mnn-model", "lama_like.mnn", "-v")
    passed = _ids(first, "PASSED")
    assert passed == ["lama_like.mnn::parity[CPU-high]", "lama_like.mnn::parity[CPU-low]"], first.outlines
    for nodeid in passed:  # with the reproduce options, and with nothing but the id
        again = pytester.runpytest(*base, nodeid, *CPU, "--mnn-model", "lama_like.mnn", "-v")
        again.assert_outcomes(passed=1)
        assert _ids(again, "PASSED") == [nodeid]
        alone = pytester.runpytest(*base, nodeid, *CPU)
        alone.assert_outcomes(passed=1)
    failing = pytester.runpytest(*base, *CPU, "--mnn-precisions", "high", "--mnn-model", "zero.fp16.mnn",
                                 "--mnn-reference", "zero.mnn")
    failed = [line.split(" ")[1] for line in failing.outlines if line.startswith("FAILED ")]
    assert failed == ["zero.fp16.mnn::parity[CPU-high]"]
    pasted = pytester.runpytest(*base, failed[0], *CPU, "--mnn-reference", "zero.mnn")
    pasted.assert_outcomes(failed=1)


def test_pasted_ids_work_with_last_failed_k_and_xdist(pytester, models):
    """Under --dist loadgroup too: a model's items go to one worker, and the ids printed (-v, FAILED, --lf's cache)
    are the plain ones, without xdist's "@<group>" suffix, which is not found when pasted."""
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn", "collapse/healthy.mnn")
    args = ["-p", "cacheprovider", *CPU, "--mnn-precisions", "high,low", "--mnn-model", "zero.fp16.mnn",
            "--mnn-model", "healthy.mnn", "--mnn-reference", "cpu"]
    first = pytester.runpytest(*args, "-n", "2", "--dist", "loadgroup", "-v")
    first.assert_outcomes(passed=2, failed=2)  # zero.fp16.mnn against itself: degenerate_reference
    shown = [line.split() for line in first.outlines if line.startswith("[gw") and ("PASSED" in line or "FAILED" in line)]
    workers: dict[str, set] = {}
    for worker, *_, nodeid in shown:
        workers.setdefault(nodeid.split("::")[0], set()).add(worker)
    assert sorted(nodeid for *_, nodeid in shown) == [
        "healthy.mnn::parity[CPU-high]", "healthy.mnn::parity[CPU-low]", "zero.fp16.mnn::parity[CPU-high]",
        "zero.fp16.mnn::parity[CPU-low]"], first.outlines
    assert all(len(w) == 1 for w in workers.values()), workers  # one worker per model
    assert not [line for line in first.outlines if "@" in line and "::parity[" in line]
    last_failed = pytester.runpytest(*args, "--lf", "-v")
    last_failed.assert_outcomes(failed=2)
    assert sorted(_ids(last_failed, "FAILED")) == ["zero.fp16.mnn::parity[CPU-high]", "zero.fp16.mnn::parity[CPU-low]"]
    by_k = pytester.runpytest(*args, "-k", "healthy and low")
    by_k.assert_outcomes(passed=1)
    spread = pytester.runpytest("healthy.mnn::parity[CPU-low]", "zero.fp16.mnn::parity[CPU-high]", *CPU, "-n", "2",
                                "--dist", "loadgroup")
    spread.assert_outcomes(passed=1, failed=1)


def test_mnn_only_without_a_model_says_what_to_give(pytester):
    result = pytester.runpytest("--mnn-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--mnn-only runs only models, and none was given: name one with --mnn-model*"])


@pytest.mark.parametrize("flag, value, hint", [
    ("--mnn-precisions", "fp16", "did you mean 'low'?"),
    ("--mnn-precisions", "hihg", "did you mean 'high'?"),
    ("--mnn-backends", "VULCAN", "did you mean 'VULKAN'?"),
    # Every option with an enumerated value, the same way.
    ("--mnn-layers", "on-falure", "did you mean 'on-failure'?"),
    ("--mnn-isolate", "allways", "did you mean 'always'?"),
    ("--mnn-worker-scope", "modle", "did you mean 'model'?"),
    ("--mnn-artifacts-when", "alway", "did you mean 'always'?"),
    ("--mnn-api", "modul", "did you mean 'module'?"),
    ("--mnn-convert", "int9", "did you mean 'int8'?"),
    ("--mnn-gpu-modes", "imgae", "did you mean 'image'?"),
])
def test_misspelled_matrix_names_get_a_suggestion(pytester, models, flag, value, hint):
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", flag, value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert hint in result.stderr.str()


def test_a_misspelled_input_name_stops_the_model_with_its_real_names(pytester, models):
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                                "--mnn-input-shape", "imgae=1x3x64x64", "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--mnn-input-shape imgae: the model has no input 'imgae' (did you mean 'image'?); "
                                 "its inputs are image: 1x3x32x32 float32 NCHW, mask: 1x1x32x32 float32 NCHW*"])
    assert read_report(pytester.path / "r.json")["results"][0]["category"] == "model_error"
    # The same from a sidecar: its file is named.
    (pytester.path / "lama_like.mnn.toml").write_text('[shapes]\nmsak = "1x1x32x32"\n')
    sidecar = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn")
    sidecar.assert_outcomes(errors=1)
    assert re.search(r"lama_like\.mnn\.toml \[shapes\] msak.*no input 'msak' \(did you mean 'mask'\?\)",
                     sidecar.stdout.str())


def test_a_broken_model_is_explained_once_not_once_per_configuration(pytester):
    (pytester.path / "broken.mnn").write_bytes(b"\x01" * 200)
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-model", "broken.mnn", "--mnn-report", "r.json")
    result.assert_outcomes(errors=4)
    text = result.stdout.str()
    # The flatbuffer error and its fix, once in the whole output (the short summary included).
    assert text.count("flatbuffer verification failed") == 1 and text.count("fix: the file is not a valid") == 1, text
    result.stdout.fnmatch_lines(["*= MNN parity: explained once =*",
                                 "model_error: broken.mnn on 4 configurations: CPU-normal, CPU-high, CPU-low, "
                                 "CPU-Low_BF16 *",
                                 "*broken.mnn: MNN cannot load it (flatbuffer verification failed*"])
    for config in ("CPU-normal", "CPU-high", "CPU-low", "CPU-Low_BF16"):  # each item still has its own line
        assert (f"model_error on {config}: broken.mnn cannot be tested (the same message on 4 configurations); "
                'explained once below, under "MNN parity: explained once"') in result.outlines
    records = read_report(pytester.path / "r.json")["results"]
    assert all("flatbuffer" in r["message"] for r in records)  # the report keeps every item's full message


def test_every_dynamic_input_is_reported_at_once_with_a_line_to_paste(pytester):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two_dynamic",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, "h", "w"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(pytester.path / "two.onnx"))
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-convert", "fp32",
                                "--mnn-model", "two.onnx")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*2 inputs have dynamic shapes: a: 1x3x?x? float32*, b: 1x3x?x? float32*",
                                 "*--mnn-input-shape a=1x3x{h}x{w} --mnn-input-shape b=1x3x{h}x{w}",
                                 "*[[]shapes[]]", '*a = "1x3x{h}x{w}"', '*b = "1x3x{h}x{w}"'])
    again = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-convert", "fp32",
                               "--mnn-model", "two.onnx", "--mnn-input-shape", "a=1x3x8x8",
                               "--mnn-input-shape", "b=1x3x8x8")
    again.assert_outcomes(passed=1)


def test_items_of_a_broken_input_set_keep_its_name_and_row(pytester, models):
    models("inputs/lama_like.mnn", "inputs/photo1.png", "inputs/mask1.png")
    (pytester.path / "lama_like.mnn.toml").write_text(
        '[input_sets.photo1]\nimage = { image = "photo1.png" }\nmask = { mask = "mask1.png" }\n\n'
        '[input_sets.broken]\nimage = { image = "nope.png" }\nmask = { mask = "mask1.png" }\n')
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                                "--mnn-report", "r.json")
    result.assert_outcomes(passed=1, errors=1)
    broken = [r for r in read_report(pytester.path / "r.json")["results"] if r["outcome"] == "error"]
    assert [r["input_set"] for r in broken] == ["broken"] and "no such image" in broken[0]["message"]
    result.stdout.fnmatch_lines(["lama_like.mnn [[]photo1[]]*PASS*", "lama_like.mnn [[]broken[]]*ERROR model_error*"])


def test_github_actions_get_an_annotation_per_failing_item_and_the_matrix_as_a_job_summary(pytester, models,
                                                                                          monkeypatch):
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn", "collapse/healthy.mnn")
    summary = pytester.path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "zero.fp16.mnn",
                                "--mnn-reference", "zero.mnn")
    result.assert_outcomes(failed=1)
    errors = [line for line in result.outlines if line.startswith("::error ")]
    assert errors == [
        "::error file=zero.fp16.mnn,title=MNN parity%3A zero_output on CPU-high::zero_output on CPU-high: output "
        "'out': every element is exactly 0; the reference is 0.0%25 zeros with max |ref| 0.7025; first divergent "
        "layer: tiny_conv (Convolution); zeros 100%25; item: zero.fp16.mnn::parity[CPU-high]"]  # % is escaped
    text = summary.read_text()
    assert text.startswith("earlier step\n## MNN parity\n\n1 failed\n")  # appended, never overwritten
    assert "| model | CPU-high |" in text and "| zero.fp16.mnn | FAIL zero_output zeros 100% |" in text
    assert "- `zero.fp16.mnn::parity[CPU-high]`: zero_output zeros 100%" in text
    # Outside GitHub Actions nothing of it.
    monkeypatch.delenv("GITHUB_ACTIONS")
    quiet = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "healthy.mnn")
    assert not [line for line in quiet.outlines if line.startswith("::")]


def test_errors_of_an_onnx_model_name_the_users_file_not_the_conversion_cache(pytester):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "c"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "c"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(pytester.path / "vad.onnx"))
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-convert", "fp32",
                                "--mnn-model", "vad.onnx", "--mnn-report", "r.json")
    result.assert_outcomes(errors=1)
    message = read_report(pytester.path / "r.json")["results"][0]["message"]
    assert "vad.onnx (its fp32 conversion): input 'x' has dynamic shape" in message.splitlines()[0], message
    assert ".pytest_cache" not in message and "mnn-parity-convert" not in message


def test_a_wrong_static_shape_is_blamed_on_the_shape_not_sent_to_the_module_api(pytester, models):
    """The LaMa-like graph's DFT matrices are 32 wide: 33x33 inputs fail on both APIs.  The message says so and
    points at the shapes first, with no dangling '(see backend:)'."""
    models("demo/lama_like.mnn")
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                                "--mnn-input-shape", "image=1x3x33x33", "--mnn-input-shape", "mask=1x1x33x33")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "auto: neither API runs this model (the session API: " in text
    assert "hint: MNN could not compute the output shapes with these input shapes, on either API" in text
    assert "the Module API runs it" not in text and "(see backend:)" not in text


def test_a_picture_that_does_not_fit_is_said_to_be_resized(pytester, models):
    from PIL import Image

    models("inputs/lama_like.mnn", "inputs/mask1.png")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(pytester.path / "wide.png")
    (pytester.path / "lama_like.mnn.toml").write_text(
        '[input_sets.wide]\nimage = { image = "wide.png" }\nmask = { mask = "mask1.png" }\n')
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                                "--mnn-report", "r.json")
    detail = read_report(pytester.path / "r.json")["results"][0]["input_detail"]
    assert "image <- wide.png (resized 50x40 -> 32x32 (bilinear), RGB, /255, as NCHW)" in detail, detail
    assert "mask <- mask1.png (mask, >= 0.5, as NCHW)" in detail  # it fits: no resize said
    result.assert_outcomes(passed=1)


def test_a_declared_stream_still_runs_beside_named_input_sets(pytester, models):
    models("stream/rnn_step.mnn")
    np = pytest.importorskip("numpy")
    np.save(pytester.path / "x.npy", np.ones((1, 4), np.float32))
    (pytester.path / "rnn_step.mnn.toml").write_text(
        '[input_sets.ones]\nx = { array = "x.npy" }\nh = { generator = "zeros" }\n\n'
        '[stream]\nstate = { h_out = "h" }\nsteps = 3\n')
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-model", "rnn_step.mnn",
                                "--mnn-report", "r.json", "-v")
    result.assert_outcomes(passed=2)
    records = {r["nodeid"]: r for r in read_report(pytester.path / "r.json")["results"]}
    assert records["rnn_step.mnn::parity[ones-CPU-high]"]["stream"] is None
    assert records["rnn_step.mnn::parity[CPU-high]"]["stream"]["steps_run"] == 3


def test_a_sidecars_shapes_reach_the_onnx_localisation_probes(pytester, models):
    """A dynamic ONNX model shaped by its sidecar alone: the probes that localise its failure need those shapes
    too (they got only --mnn-input-shape, converted 24 probes and found nothing)."""
    models("onnx/dynamic_hw.onnx")
    (pytester.path / "dynamic_hw.onnx.toml").write_text(
        '[shapes]\nimage = "1x3x16x16"\n\n[tolerance]\natol = 0\nrtol = 0\nmax_outside_fraction = 0\nabs_floor = 0\n')
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high", "--mnn-convert", "fp16",
                                "--mnn-model", "dynamic_hw.onnx", "--mnn-report", "r.json")
    result.assert_outcomes(failed=1)
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert rec["first_divergent_layer"] is not None and rec["first_divergent_layer"]["name"] == "conv", rec["message"]


def _section(lines: list[str], header: str) -> list[str]:
    """The lines of one item's failure section: after its ``___ header ___`` line, up to the next separator."""
    start = next(i for i, line in enumerate(lines) if header in line and line.startswith("_"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("___", "===", "-")))
    return lines[start + 1:end]


def test_a_failure_shared_by_several_configurations_is_explained_once(pytester, models, monkeypatch):
    """Once, in the terminal summary, listing the configurations; each item keeps its headline and reproduce line.
    Under CI (where pytest's short summary prints a plain-text failure whole) as well."""
    monkeypatch.setenv("CI", "true")
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    result = pytester.runpytest("--mnn-only", *CPU, "--mnn-precisions", "high,low", "--mnn-model", "zero.fp16.mnn",
                                "--mnn-reference", "zero.mnn", "--mnn-report", "r.json", "--junitxml", "j.xml")
    result.assert_outcomes(failed=2)
    text, lines = result.stdout.str(), result.outlines
    assert text.count("first divergent layer: tiny_conv (Convolution") == 1, text  # the long explanation, once
    assert text.count("fp16 weight risk") == 1
    section = lines.index(next(line for line in lines if "= MNN parity: explained once =" in line))
    assert lines[section + 1] == ("zero_output, first divergent layer tiny_conv: zero.fp16.mnn on 2 configurations: "
                                  "CPU-high, CPU-low (the message of CPU-high; each item's own line is above)")
    assert lines.index("first divergent layer: tiny_conv (Convolution, #1) [zero]; its inputs were within "
                       "tolerance") > section
    for precision in ("high", "low"):
        own = _section(lines, f"zero.fp16.mnn::parity[CPU-{precision}] (MNN parity)")
        assert len(own) == 3, own
        assert own[0].startswith(f"zero_output on CPU-{precision}: output 'out': every element is exactly 0; "
                                 "the reference is 0.0% zeros with max |ref| 0.7025")
        assert own[1] == ('explained once below, under "MNN parity: explained once" (the same zero_output, first '
                          "divergent layer tiny_conv on 2 configurations)")
        assert own[2].startswith(f"reproduce: pytest --mnn-only --mnn-model zero.fp16.mnn --mnn-backends CPU "
                                 f"--mnn-precisions {precision} ")
        # The short summary: one line an item, its headline.
        assert any(line.startswith(f"FAILED zero.fp16.mnn::parity[CPU-{precision}] - zero_output on "
                                   f"CPU-{precision}: output 'out'") for line in lines)
    # The report and JUnit keep each item's whole explanation.
    assert all("first divergent layer: tiny_conv" in r["message"]
               for r in read_report(pytester.path / "r.json")["results"])
    failures = ElementTree.parse(pytester.path / "j.xml").findall(".//failure")
    assert len(failures) == 2 and all("first divergent layer: tiny_conv" in f.text for f in failures)


def test_a_histograms_peak_count_labels_the_top_of_its_count_axis_not_the_baseline():
    """Read from the pixels: the dark text left of the plot sits level with the tallest bar's top (the peak count,
    four digits wide) and, narrow, at the baseline (the 0)."""
    np = pytest.importorskip("numpy")
    from pytest_mnn_parity.report.pictures import error_histogram

    reference = np.zeros(5000, np.float32)
    target = 10 ** np.random.default_rng(0).normal(-4, 0.3, 5000).astype(np.float32)
    pixels = np.asarray(error_histogram(target, reference, 1e-3).convert("RGB")).astype(int)
    bars = np.all(pixels == (70, 110, 170), axis=2)
    rows_with_bars = np.flatnonzero(bars.any(axis=1))
    top, baseline = int(rows_with_bars.min()), int(rows_with_bars.max())
    dark = pixels.max(axis=2) < 100
    # The plot's left edge: the count axis (a dark column from the bars' top to the baseline), else the first bar.
    axis = [c for c in range(dark.shape[1]) if dark[top:baseline, c].mean() > 0.8] or [np.flatnonzero(bars.any(0))[0]]
    text = dark[:, :axis[0] - 5].copy()  # dark pixels in the margin left of the count axis and its ticks
    text[:18] = False  # the title line
    text[baseline + 5:] = False  # the x axis's labels
    rows = np.flatnonzero(text.any(axis=1))
    near_top = text[max(top - 8, 0):top + 8]
    near_base = text[baseline - 8:baseline + 5]
    assert near_top.any(), f"no label at the peak (bar top at row {top}); margin text on rows {rows.tolist()}"
    assert near_base.any(), f"no label at the baseline (row {baseline}); margin text on rows {rows.tolist()}"
    width = lambda block: int(np.ptp(np.flatnonzero(block.any(axis=0)))) + 1  # noqa: E731
    assert width(near_top) > 2 * width(near_base)  # "1547" above, "0" below
    assert set(rows) <= set(range(top - 8, top + 8)) | set(range(baseline - 8, baseline + 5))


def test_a_long_run_shows_a_progress_line_per_model_quiet_under_q_ci_and_logs(pytester, models):
    models("demo/lama_like.mnn", "collapse/healthy.mnn")
    # In process (no CPU worker to start): the lines are about counting items, not about where they ran.
    args = ["--mnn-only", *CPU, "--mnn-isolate", "never", "--mnn-precisions", "high,low", "--mnn-model",
            "lama_like.mnn", "--mnn-model", "healthy.mnn"]
    shown = pytester.runpytest(*args, "--mnn-progress", "0.000001")  # a line after every item
    shown.assert_outcomes(passed=4)
    progress = [line for line in shown.outlines if line.startswith("mnn-parity progress: ")]
    assert [re.sub(r", [\d.]+ s elapsed$", "", line) for line in progress] == [
        f"mnn-parity progress: {model}: {done}/2 configurations done"
        for model in ("lama_like.mnn", "healthy.mnn") for done in (1, 2)], shown.outlines
    one = ["--mnn-only", *CPU, "--mnn-isolate", "never", "--mnn-precisions", "high", "--mnn-model", "healthy.mnn"]
    quiet = pytester.runpytest(*one, "--mnn-progress", "0.000001", "-q")
    default = pytester.runpytest(*one)  # pytester's output is not a terminal
    for result in (quiet, default):
        result.assert_outcomes(passed=1)
        assert not [line for line in result.outlines if "mnn-parity progress" in line]
    from pytest_mnn_parity.plugin.progress import interval_for

    assert interval_for(None, 0, isatty=True, environ={}) == 10.0  # an interactive terminal
    assert interval_for(None, 1, isatty=True, environ={"CI": "true"}) is None
    assert interval_for(None, 0, isatty=False, environ={}) is None
    assert interval_for(5.0, 0, isatty=False, environ={"CI": "true"}) == 5.0  # asked for: a CI log gets it too
    assert interval_for(5.0, -1, isatty=True, environ={}) is None  # -q
    bad = pytester.runpytest(*one, "--mnn-progress", "-1")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "--mnn-progress: expected seconds >= 0" in bad.stderr.str()


def test_shared_explanations_group_the_same_failures_whatever_order_the_items_finished_in():
    """Under pytest-xdist items finish in any order: the groups (who is explained with whom) must not depend on it."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from pytest_mnn_parity.report.explained import failure_key, shared_failures

    record = st.fixed_dictionaries({
        "model": st.sampled_from(["a.mnn", "b.mnn"]),
        "outcome": st.sampled_from(["failed", "error", "passed", "skipped"]),
        "category": st.sampled_from(["zero_output", "mismatch", "model_error", "ok"]),
        "first_divergent_layer": st.sampled_from([None, {"name": "conv"}, {"name": "relu"}]),
        "outputs": st.sampled_from([{}, {"out": {"category": "zero_output"}}, {"out": {"category": "ok"}}]),
        "message": st.sampled_from(["broken", "zero_output on X: ...\nreproduce: pytest x"]),
    })

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(st.lists(record, max_size=12), st.randoms(use_true_random=False))
    def check(records, rnd):
        records = [{**r, "nodeid": f"{r['model']}::parity[C{i}]"} for i, r in enumerate(records)]
        shuffled = records[:]
        rnd.shuffle(shuffled)
        groups = {frozenset(g.nodeids) for g in shared_failures(records)}
        assert groups == {frozenset(g.nodeids) for g in shared_failures(shuffled)}
        by_id = {r["nodeid"]: r for r in records}
        for members in groups:
            assert len(members) >= 2 and len({failure_key(by_id[n]) for n in members}) == 1
            assert all(by_id[n]["outcome"] in ("failed", "error") for n in members)
        grouped = [n for members in groups for n in members]
        assert len(grouped) == len(set(grouped))  # an item is explained in one place

    check()
