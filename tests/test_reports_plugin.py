"""--mnn-artifacts, --mnn-html and the pytest-html extras, run as a user runs them (pytester)."""
from __future__ import annotations

import shlex
import shutil

import pytest

from conftest import read_report
from test_reports import parse_html

CPU_HIGH = ("--mnn-only", "--mnn-backends", "CPU,METAL", "--mnn-precisions", "high")
COLLAPSED = ("--mnn-model", "partial_zero.fp16.mnn", "--mnn-reference", "partial_zero.mnn")
NODEID = "partial_zero.fp16.mnn::parity[CPU-high]"


def test_pictures_are_linked_from_the_json_named_in_the_message_and_reproducible(pytester, models):
    models("collapse/partial_zero.fp16.mnn", "collapse/partial_zero.mnn")
    result = pytester.runpytest(*CPU_HIGH, *COLLAPSED, "--mnn-artifacts", "art", "--mnn-html", "out/r.html",
                                "--mnn-report", "r.json")
    result.assert_outcomes(failed=1, skipped=1)
    report = read_report(pytester.path / "r.json")
    root = pytester.path / "art"
    assert report["settings"]["artifacts"] == {"dir": str(root), "when": "on-failure"}
    rec = next(r for r in report["results"] if r["nodeid"] == NODEID)
    assert rec["artifacts"]["dir"] == "partial_zero.fp16.mnn/parity[CPU-high]"
    links = [info[kind] for group in ("outputs", "layers") for info in rec["artifacts"][group].values()
             for kind in ("reference", "target", "error", "mask", "histogram") if kind in info]
    assert len(links) == 10 and all((root / link).is_file() for link in links)
    skipped = next(r for r in report["results"] if r["outcome"] == "skipped")
    assert skipped["artifacts"] is None
    assert "pictures:  art/partial_zero.fp16.mnn/parity[CPU-high]" in result.stdout.str()
    assert "MNN parity HTML: out/r.html" in result.stdout.str()
    page = parse_html((pytester.path / "out" / "r.html").read_text())
    assert set(page.cells) == {NODEID} and len(page.images) == len(links)
    mask = root / rec["artifacts"]["outputs"]["out"]["mask"]
    before = mask.read_bytes()
    shutil.rmtree(root)
    command = next(line.split("reproduce: ", 1)[1] for line in result.outlines if "reproduce: " in line)
    assert "--mnn-artifacts art" in command
    again = pytester.runpytest(*shlex.split(command)[1:])
    again.assert_outcomes(failed=1)
    assert mask.read_bytes() == before  # the same pictures, pixel for pixel


def test_ini_keys_and_always(pytester, models):
    models("demo/lama_like.mnn")
    pytester.makeini("[pytest]\nmnn_artifacts = pics\nmnn_artifacts_when = always\nmnn_html = pics/index.html\n")
    result = pytester.runpytest("--mnn-only", "--mnn-model", "lama_like.mnn", "--mnn-backends", "CPU",
                                "--mnn-precisions", "low")
    result.assert_outcomes(passed=1)
    folder = pytester.path / "pics" / "lama_like.mnn" / "parity[CPU-low]"
    assert sorted(p.name for p in folder.iterdir()) == [f"inpainted.{k}.png" for k in
                                                        ("error", "histogram", "mask", "reference", "target")]
    assert len(parse_html((pytester.path / "pics" / "index.html").read_text()).images) == 5


def test_artifacts_when_must_be_a_known_mode(pytester):
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", "--mnn-artifacts", "a",
                                "--mnn-artifacts-when", "sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--mnn-artifacts-when: expected one of on-failure, always, got 'sometimes'" in result.stderr.str()


def test_html_is_written_when_a_model_cannot_load(pytester, models):
    models("demo/lama_like.mnn")
    (pytester.path / "empty.mnn").write_bytes(b"")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high", "--mnn-model",
                                "empty.mnn", "--mnn-model", "lama_like.mnn", "--mnn-html", "r.html")
    result.assert_outcomes(passed=1, errors=1)
    page = parse_html((pytester.path / "r.html").read_text())
    assert page.rows == ["empty.mnn", "lama_like.mnn"]
    assert page.cells["empty.mnn::load"]["class"] == "g-error"
    assert "empty.mnn: is empty (0 bytes)" in (pytester.path / "r.html").read_text()


def test_pytest_html_gets_the_verdict_column_tables_and_pictures(pytester, models):
    pytest.importorskip("pytest_html")
    models("collapse/partial_zero.fp16.mnn", "collapse/partial_zero.mnn")
    pytester.makepyfile(test_user="def test_user():\n    pass\n")
    result = pytester.runpytest("--mnn-backends", "CPU", "--mnn-precisions", "high", *COLLAPSED,
                                "--mnn-artifacts", "art", "--html", "h.html", "--self-contained-html")
    result.assert_outcomes(passed=1, failed=1)
    text = (pytester.path / "h.html").read_text()
    assert "MNN verdict" in text and "mnn-broken" in text and "partial_zero" in text
    assert "First divergent layer" in text and "tiny_conv" in text and "svg" in text
    assert text.count("data:image/png;base64,") == 10


def test_group_marks_need_no_xdist_even_with_strict_markers(pytester, models):
    models("demo/lama_like.mnn")
    # In a subprocess: in-process runs share pytest's marker cache with this session, which knows xdist_group.
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--strict-markers", "--mnn-only", "--mnn-model",
                                           "lama_like.mnn", "--mnn-backends", "CPU", "--mnn-precisions", "high")
    result.assert_outcomes(passed=1)
