"""report_diff: two real reports of a model before and after a change; the classification's invariants."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from pytest_mnn_parity.report.diff import (DRIFT_FACTOR, FAIL_ON, ReportError, compare_items, diff_reports,
                                           load_report, main)

from conftest import COLLAPSE, plugin_env


@pytest.fixture(scope="module")
def before_after(tmp_path_factory):
    """The same model id before and after a re-conversion with --fp16 (its tiny weights flush to zero)."""
    work = tmp_path_factory.mktemp("diff")
    shutil.copyfile(COLLAPSE / "zero.mnn", work / "ref.mnn")
    reports = {}
    for run, build in (("base", "zero.mnn"), ("head", "zero.fp16.mnn")):
        shutil.copyfile(COLLAPSE / build, work / "model.mnn")
        subprocess.run([sys.executable, "-m", "pytest", "--mnn-only", "--mnn-model", "model.mnn", "--mnn-reference",
                        "ref.mnn", "--mnn-backends", "CPU", "--mnn-precisions", "high,low", "--mnn-report",
                        f"{run}.json", "-p", "no:cacheprovider", "-q"], cwd=work, env=plugin_env(),
                       capture_output=True, timeout=300)
        reports[run] = work / f"{run}.json"
    return work, reports


def test_a_model_that_collapsed_is_worse_with_its_category_and_number(before_after, capsys):
    work, reports = before_after
    assert main([str(reports["base"]), str(reports["head"]), "--json", str(work / "d.json")]) == 1
    out = capsys.readouterr().out
    assert "worse (2):" in out
    assert "model.mnn::parity[CPU-high]: passed ok (max|d| 0) -> failed zero_output (zeros 100%)" in out
    assert out.rstrip().endswith("2 worse; 0 unchanged")
    written = json.loads((work / "d.json").read_text())
    assert written["counts"] == {"worse": 2}
    assert written["changes"][0]["head"]["first_divergent_layer"] == "tiny_conv"


def test_the_reverse_change_is_better_and_does_not_fail(before_after, capsys):
    _, reports = before_after
    assert main([str(reports["head"]), str(reports["base"])]) == 0
    assert "better (2):" in capsys.readouterr().out


def test_a_report_against_itself_has_no_changes(before_after):
    _, reports = before_after
    report = load_report(reports["head"])
    diff = diff_reports(report, report)
    assert diff.changes == [] and diff.unchanged == len(report["results"]) == 2


def test_drift_is_the_margin_eaten_before_a_verdict_changes(before_after):
    """A copy of a real passing report whose max abs error grew, as a kernel change would leave it."""
    _, reports = before_after
    base = load_report(reports["base"])
    record = base["results"][0]
    output = next(iter(record["outputs"]))
    bound = record["tolerance"]["atol"] + record["tolerance"]["rtol"]
    for new_max, drifts in ((0.5 * bound, True), (0.01 * bound, False)):
        head = copy.deepcopy(base)
        head["results"][0]["outputs"][output]["max_abs"] = new_max
        record["outputs"][output]["max_abs"] = new_max / (DRIFT_FACTOR * 3)
        change = compare_items(record["nodeid"], record, head["results"][0])
        assert (change is not None and change.kind == "drift") is drifts, change
        if drifts:
            assert f"{output}: max abs" in change.detail and "of its tolerance" in change.detail


def test_a_backend_that_stopped_running_is_untested_not_worse(before_after):
    _, reports = before_after
    base = load_report(reports["base"])
    head = copy.deepcopy(base)
    head["results"][1].update(outcome="skipped", category="backend_unavailable")
    diff = diff_reports(base, head)
    assert [c.kind for c in diff.changes] == ["untested"]
    assert not diff.failing("worse") and diff.failing("any")


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("not json", "not a JSON report"),
    ('{"schema": "pytest-mnn-parity/bundle/1", "results": []}', "not a pytest-mnn-parity report"),
])
def test_a_file_that_is_not_a_report_is_exit_2_naming_the_file_and_the_fix(tmp_path, before_after, capsys, content,
                                                                            problem):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main([str(bad), str(before_after[1]["head"])]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: {problem}" in err and f"pytest --mnn-report {bad}" in err
    with pytest.raises(ReportError):
        load_report(bad)


# -- invariants over synthetic records (the logic, not MNN) ------------------------------------------------------

_CATEGORIES = ["ok", "mismatch", "zero_output", "non_finite", "stale_output", "crashed", "backend_unavailable"]


@st.composite
def records(draw):
    outcome = draw(st.sampled_from(["passed", "failed", "skipped", "xfailed"]))
    category = "ok" if outcome == "passed" else draw(st.sampled_from(_CATEGORIES))
    max_abs = draw(st.floats(0, 10, allow_nan=False) | st.sampled_from(["inf", "nan", None]))
    return {"nodeid": "m.mnn::parity[CPU-high]", "outcome": outcome, "category": category,
            "backend_used": draw(st.sampled_from(["CPU", "OPENCL", None])),
            "arithmetic": {"kind": draw(st.sampled_from(["fp32", "fp16"]))},
            "tolerance": {"atol": 1e-3, "rtol": 1e-3},
            "outputs": {"out": {"max_abs": max_abs, "ref_scale": 1.0}}}


_MIRROR = {"worse": "better", "better": "worse", "untested": "retested", "retested": "untested", "changed": "changed",
           "drift": "drift", "backend": "backend", None: None}


@given(records(), records())
def test_swapping_the_reports_mirrors_every_classification(b, h):
    forward, backward = compare_items("x", b, h), compare_items("x", h, b)
    assert _MIRROR[forward and forward.kind] == (backward and backward.kind)


@given(records())
def test_an_item_never_changes_against_itself(record):
    assert compare_items("x", record, copy.deepcopy(record)) is None


@given(st.lists(records(), max_size=6), st.sampled_from(sorted(FAIL_ON)))
def test_every_item_is_counted_once(items, fail_on):
    base = {"results": [dict(r, nodeid=f"m{i}") for i, r in enumerate(items)]}
    head = {"results": [dict(r, nodeid=f"m{i}") for i, r in enumerate(reversed(items))]}
    diff = diff_reports(base, head)
    assert diff.unchanged + len(diff.changes) == len(items)
    assert set(c.kind for c in diff.failing(fail_on)) <= set(FAIL_ON[fail_on])


def test_the_console_script_is_installed_and_points_here():
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "mnn-parity-diff"]
    assert script.load() is main
