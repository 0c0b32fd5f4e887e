"""Output bundles: saved by real runs, compared against by real runs, refused when they do not match."""
from __future__ import annotations

import json
import os
import shutil
import string

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pytest_mnn_parity.engine.bundle import BUNDLE_FILE, BundleWriter, entry_id, load_outputs, read_entries
from pytest_mnn_parity.core.tolerances import looser_tier
from pytest_mnn_parity.engine.bundle_reference import parse_reference
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import RunConfig

from conftest import FIXTURES, REPO, read_report, results_by_nodeid

CPU = ("--mnn-only", "--mnn-backends", "CPU")
COMMITTED = FIXTURES / "bundles" / "mnn-3.4.0-x86_64"


def _entries(folder):
    return {(e["model"], e["kind"], e["config"]["id"]): e for e in read_entries(folder)}


def test_round_trip_save_then_compare_by_reference_selector_and_same(pytester, models):
    models("demo/lama_like.mnn", "multi_io.mnn")
    two = ("--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn")
    saved = pytester.runpytest(*CPU, "--mnn-backends", "CPU,METAL", "--mnn-precisions", "high,low", *two,
                               "--mnn-save-outputs", "B")
    saved.assert_outcomes(passed=4, skipped=4)
    saved.stdout.fnmatch_lines(["MNN output bundle: B (6 entries, MNN *)"])
    entries = _entries(pytester.path / "B")
    # Per model: the reference and each configuration that ran; skipped METAL has nothing to save.
    assert set(entries) == {(m, k, c) for m in ("lama_like.mnn", "multi_io.mnn")
                            for k, c in (("reference", "CPU-high"), ("config", "CPU-high"), ("config", "CPU-low"))}
    low = entries[("multi_io.mnn", "config", "CPU-low")]
    assert low["backend_used"] == "CPU" and low["config"]["threads"] == 4 and low["category"] == "ok"
    assert low["input_sets"]["A"]["seed"] == 0 and low["input_sets"]["B"]["seed"] == 1
    assert low["inputs"]["ids"] == {"shape": [1, 4], "dtype": "int32", "layout": "NCHW"}
    assert low["mnn_version"] and low["machine"]["system"] and low["arithmetic"]["kind"] == "fp32"
    a, b = load_outputs(pytester.path / "B", low)
    assert a["ids_out"].dtype == np.int32 and not np.array_equal(a["ids_out"], b["ids_out"])
    index = json.loads((pytester.path / "B" / BUNDLE_FILE).read_text())
    assert len(index["entries"]) == 6

    for ref, label in (("B", "bundle B::reference"), ("B::CPU-low", "bundle B::CPU-low"), ("B::same", "bundle B::same")):
        again = pytester.runpytest(*CPU, "--mnn-precisions", "high,low", *two, "--mnn-reference", ref,
                                   "--mnn-report", "r.json")
        again.assert_outcomes(passed=4)
        records = read_report(pytester.path / "r.json")["results"]
        assert {r["reference_label"] for r in records} == {label}
        by_id = results_by_nodeid(read_report(pytester.path / "r.json"))
        ran_low = by_id["multi_io.mnn::parity[CPU-low]"]
        expected = "CPU-high" if ref == "B" else "CPU-low"
        assert f"entry {'reference' if ref == 'B' else expected}: multi_io.mnn on CPU" in ran_low["reference"]
        assert "MNN " in ran_low["reference"] and ran_low["outputs"]["ids_out"]["max_abs"] == 0.0
        again.stdout.fnmatch_lines([f"reference *: {label}*"])


def test_mismatches_are_clear_errors_naming_both_hashes_and_the_fix(pytester, models):
    models("demo/lama_like.mnn", "multi_io.mnn")
    pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                       "--mnn-save-outputs", "B").assert_outcomes(passed=1)
    seed = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                              "--mnn-reference", "B", "--mnn-seed", "3", "--mnn-report", "r.json")
    seed.assert_outcomes(errors=1)
    rec = read_report(pytester.path / "r.json")["results"][0]
    assert rec["category"] == "model_error"
    bundle_sets = _entries(pytester.path / "B")[("lama_like.mnn", "reference", "CPU-high")]["input_sets"]
    message = rec["message"]
    assert "input-set hash mismatch" in message and "(seed 0)" in message and "(seed 3)" in message
    assert bundle_sets["A"]["fingerprint"] in message and bundle_sets["B"]["fingerprint"] in message
    assert "fix: run with --mnn-seed 0" in message

    # Same file name, other bytes: a different model, never compared.
    shutil.copyfile(FIXTURES / "multi_io.mnn", pytester.path / "lama_like.mnn")
    other = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "lama_like.mnn",
                               "--mnn-reference", "B")
    other.assert_outcomes(errors=1)
    text = other.stdout.str()
    assert "model hash mismatch" in text and "they are different models" in text

    missing = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "multi_io.mnn",
                                 "--mnn-reference", "B::CPU-high")
    missing.assert_outcomes(errors=1)
    assert "holds no outputs of this model" in missing.stdout.str()
    assert "--mnn-save-outputs B" in missing.stdout.str()


def test_named_input_sets_and_onnx_conversions_round_trip(pytester, models):
    """A sidecar's input sets are entries of their own; an ONNX conversion is known by its source's bytes
    (the converter stamps every .mnn with a random id, so the converted bytes differ per run)."""
    models("inputs/lama_like.mnn", "inputs/lama_like.mnn.toml", "inputs/photo1.png", "inputs/photo2.png",
           "inputs/mask1.png", "inputs/mask2.png", "onnx/multi_io.onnx")
    args = [*CPU, "--mnn-precisions", "low", "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.onnx",
            "--mnn-convert", "fp32,fp16"]
    pytester.runpytest(*args, "--mnn-save-outputs", "B").assert_outcomes(passed=4)
    entries = read_entries(pytester.path / "B")
    sets = {(e["input_set"], e["kind"]) for e in entries if e["model"] == "lama_like.mnn"}
    assert sets == {(s, k) for s in ("photo1", "photo2") for k in ("reference", "config")}
    onnx = [e for e in entries if e["model"] == "multi_io.onnx"]
    assert {e["variant"] for e in onnx} == {"fp32", "fp16"} and all(e["source_sha256"] for e in onnx)
    assert {e["backend_used"] for e in onnx if e["kind"] == "reference"} == {"onnxruntime"}
    again = pytester.runpytest(*args, "--mnn-reference", "B::same", "--mnn-report", "r.json")
    again.assert_outcomes(passed=4)
    for rec in read_report(pytester.path / "r.json")["results"]:
        assert rec["outputs"] and all(o["max_abs"] == 0.0 for o in rec["outputs"].values()), rec["nodeid"]


def test_isolated_workers_save_their_configurations_themselves(pytester, models):
    """The outputs live in the worker, which writes them into the bundle: no configuration is lost, none runs
    unprotected (test_isolation_wire.py compares the bundle with an in-process one)."""
    models("multi_io.mnn")
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high,low", "--mnn-model", "multi_io.mnn",
                                "--mnn-isolate", "always", "--mnn-save-outputs", "B", "--mnn-report", "r.json")
    result.assert_outcomes(passed=2)
    assert {(e["kind"], e["config"]["id"]) for e in read_entries(pytester.path / "B")} == {
        ("reference", "CPU-high"), ("config", "CPU-high"), ("config", "CPU-low")}
    assert all(r["worker"]["pid"] > 0 for r in read_report(pytester.path / "r.json")["results"])


def test_a_control_flow_model_on_the_module_api_saves_compares_and_has_a_golden(pytester, models):
    """The session API cannot run it; with a bundle as reference the API is still chosen by a real run."""
    models("control_flow/if_branch.mnn")
    base = [*CPU, "--mnn-precisions", "high", "--mnn-model", "if_branch.mnn", "--mnn-golden", "G"]
    pytester.runpytest(*base, "--mnn-save-outputs", "B", "--mnn-update-golden").assert_outcomes(passed=2)
    (entry,) = [e for e in read_entries(pytester.path / "B") if e["kind"] == "config"]
    assert entry["category"] == "ok" and list(entry["outputs"]) == ["out"]
    again = pytester.runpytest(*base, "--mnn-reference", "B::same")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["if_branch.mnn*PASS (module) max|d| 0*PASS max|d| 0"])


def test_a_selected_configuration_the_bundle_lacks_lists_what_it_has(pytester, models):
    models("multi_io.mnn")
    pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "multi_io.mnn",
                       "--mnn-save-outputs", "B").assert_outcomes(passed=1)
    result = pytester.runpytest(*CPU, "--mnn-precisions", "high", "--mnn-model", "multi_io.mnn",
                                "--mnn-reference", "B::metal-LOW")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*bundle B has no METAL-low outputs of this model; it has CPU-high, reference*",
                                 "*fix: pick one with --mnn-reference B::CPU-high*"])


@pytest.mark.parametrize(("args", "message"), [
    (["--mnn-reference", "nowhere::same"], "--mnn-reference nowhere::same: nowhere does not exist"),
    (["--mnn-reference", "plain"], "is a directory but not an output bundle (no mnn-bundle.json)"),
    (["--mnn-reference", "B::FOO"], "selector 'FOO'"),
    (["--mnn-save-outputs", "plain"], "not empty and is not an output bundle"),
    (["--mnn-save-outputs", "B", "--mnn-reference", "B"], "is the bundle --mnn-reference reads"),
    (["--mnn-update-golden"], "--mnn-update-golden needs --mnn-golden DIR"),
])
def test_bad_bundle_options_are_usage_errors(pytester, args, message):
    (pytester.path / "plain").mkdir()
    (pytester.path / "plain" / "notes.txt").write_text("not a bundle")
    BundleWriter(pytester.path / "B").start()
    result = pytester.runpytest("--mnn-only", "--mnn-model", "x.mnn", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_xdist_workers_write_one_bundle_and_the_controller_merges_the_index(pytester, models, monkeypatch):
    pytest.importorskip("xdist")
    # The subprocess must import this checkout's plugin, as the in-process runs do (a relative
    # PYTHONPATH would not resolve from the pytester directory).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    models("demo/lama_like.mnn", "multi_io.mnn")
    args = [*CPU, "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn"]
    result = pytester.runpytest_subprocess(*args, "-n", "2", "--mnn-save-outputs", "B")
    result.assert_outcomes(passed=8)
    entries = read_entries(pytester.path / "B")
    assert len(entries) == 10  # 2 models x (4 configurations + reference)
    index = json.loads((pytester.path / "B" / BUNDLE_FILE).read_text())
    assert sorted(e["id"] for e in index["entries"]) == sorted(e["id"] for e in entries)
    assert not [p for p in (pytester.path / "B" / "entries").iterdir() if p.name.startswith(".")]
    pytester.runpytest_subprocess(*args, "-n", "2", "--mnn-reference", "B::same").assert_outcomes(passed=8)


def test_saved_layer_traces_localise_a_failure_against_the_bundle(pytester, models):
    """The bundle of an fp16 build holds its fp32 build's outputs and per-op tensors as its reference."""
    models("collapse/zero.fp16.mnn", "collapse/zero.mnn")
    base = [*CPU, "--mnn-precisions", "high", "--mnn-model", "zero.fp16.mnn"]
    saved = pytester.runpytest(*base, "--mnn-reference", "zero.mnn", "--mnn-layers", "always",
                               "--mnn-save-outputs", "B")
    saved.assert_outcomes(failed=1)
    entries = _entries(pytester.path / "B")
    reference = entries[("zero.fp16.mnn", "reference", "CPU-high")]
    assert reference["layers"]["order"] and reference["description"] == "zero.mnn on CPU high, 4 threads"
    assert reference["reference_model_sha256"] != reference["model_sha256"]
    assert entries[("zero.fp16.mnn", "config", "CPU-high")]["category"] == "zero_output"
    again = pytester.runpytest(*base, "--mnn-reference", "B")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*zero_output on CPU-high*",
                                "*first divergent layer: tiny_conv (Convolution, #1) [[]zero]; its inputs were within tolerance*",
                                "*reproduce: pytest --mnn-only --mnn-model zero.fp16.mnn * --mnn-reference B*"])
    # Without saved tensors the message says why nothing is localised.
    pytester.runpytest(*base, "--mnn-reference", "zero.mnn", "--mnn-save-outputs", "C")
    plain = pytester.runpytest(*base, "--mnn-reference", "C")
    plain.assert_outcomes(failed=1)
    assert "no per-layer trace in the bundle to localise with" in plain.stdout.str()


def test_FAKE_fp16_entry_is_compared_at_the_looser_fp16_tier(pytester, models):
    """A Metal `low` bundle cannot be made on this machine: the saved reference entry is edited (FAKE) to
    claim what a Mac would record (METAL, measured fp16).  Its real outputs are the fp32 build's, which
    the fp16 build misses at the fp32 tier but meets at the fp16 tier."""
    models("collapse/healthy.fp16.mnn", "collapse/healthy.mnn")
    base = [*CPU, "--mnn-precisions", "high", "--mnn-model", "healthy.fp16.mnn"]
    pytester.runpytest(*base, "--mnn-reference", "healthy.mnn", "--mnn-save-outputs", "B")
    strict = pytester.runpytest(*base, "--mnn-reference", "B", "--mnn-report", "strict.json")
    strict.assert_outcomes(failed=1)
    assert read_report(pytester.path / "strict.json")["results"][0]["tolerance"]["tier"] == "fp32"
    path = next((pytester.path / "B" / "entries").glob("*--reference--*.json"))
    fake = json.loads(path.read_text())
    fake.update(backend_used="METAL", config=dict(fake["config"], id="METAL-low", backend="METAL", precision="low"),
                arithmetic={"kind": "fp16", "probe_errors": {"add": 0.25}})
    path.write_text(json.dumps(fake))
    loose = pytester.runpytest(*base, "--mnn-reference", "B", "--mnn-report", "loose.json")
    loose.assert_outcomes(passed=1)
    rec = read_report(pytester.path / "loose.json")["results"][0]
    assert rec["tolerance"]["tier"] == "fp16" and "(ran on METAL, fp16)" in rec["reference"]


def test_a_damaged_output_file_is_named(tmp_path):
    shutil.copytree(COMMITTED, tmp_path / "b")
    entry = next(e for e in read_entries(tmp_path / "b") if e["kind"] == "reference" and "multi_io" in e["model"])
    a, b = load_outputs(tmp_path / "b", entry)
    a["scores"] = a["scores"] + 1e-3
    from pytest_mnn_parity.engine.bundle import save_npz

    save_npz(tmp_path / "b" / "entries" / entry["outputs_file"],
             {f"A/{k}": v for k, v in a.items()} | {f"B/{k}": v for k, v in b.items()})
    engine = ParityEngine(ParitySettings(reference=str(tmp_path / "b")))
    result = engine.check(FIXTURES / "multi_io.mnn", RunConfig("CPU", "high"))
    assert result.category.value == "model_error"
    assert "does not match the sha256 in its manifest" in result.message and entry["outputs_file"] in result.message


def test_engine_without_pytest_against_the_committed_mnn_3_4_bundle():
    engine = ParityEngine(ParitySettings(reference=f"{COMMITTED}::same"))
    for precision in ("high", "Low_BF16"):
        result = engine.check(FIXTURES / "demo" / "lama_like.mnn", RunConfig("CPU", precision))
        assert result.passed, result.message
        assert f"entry CPU-{precision}:" in result.reference and "MNN 3.4.0" in result.reference
    assert parse_reference(str(FIXTURES / "demo" / "lama_like.mnn")) is None
    assert parse_reference("cpu") is None


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.text(string.ascii_letters + string.digits + "/:._- ", min_size=1, max_size=20),
                      min_size=1, max_size=4, unique=True),
       dtype=st.sampled_from(["float32", "int32", "uint8", "float64", "int64"]),
       shape=st.lists(st.integers(1, 4), min_size=0, max_size=3))
def test_outputs_round_trip_bit_exactly_whatever_their_names(tmp_path_factory, names, dtype, shape):
    folder = tmp_path_factory.mktemp("b")
    writer = BundleWriter(folder)
    writer.start()
    rng = np.random.default_rng(len(names))
    a = {n: (rng.standard_normal(shape) * 100).astype(dtype) for n in names}
    b = {n: v + 1 for n, v in a.items()}
    manifest = {"schema": "pytest-mnn-parity-bundle/1", "id": entry_id("m.mnn", None, "CPU-low"), "kind": "config",
                "model": "m.mnn", "model_sha256": "0" * 64, "config": {"id": "CPU-low"}}
    writer.save_entry(manifest, a, b)
    (entry,) = read_entries(folder)
    got_a, got_b = load_outputs(folder, entry)
    assert list(got_a) == names
    for n in names:
        assert got_a[n].dtype == a[n].dtype and np.array_equal(got_a[n], a[n]) and np.array_equal(got_b[n], b[n])
    assert len(writer.finish()["entries"]) == 1


@given(labels=st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=6, unique=True),
       config=st.sampled_from(["CPU-low", "METAL-high", "reference"]))
def test_entry_ids_are_file_names_and_distinct(labels, config):
    ids = [entry_id(label, None, config) for label in labels]
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert "/" not in i and i == i.strip() and not i.startswith(".")


@given(kind=st.sampled_from(["fp32", "fp16", "bf16", "unknown", "broken"]),
       ref=st.sampled_from([None, "fp32", "fp16", "bf16"]),
       precision=st.sampled_from(["normal", "high", "low", "Low_BF16"]))
def test_the_tier_against_a_bundle_is_never_tighter_than_either_side(kind, ref, precision):
    from pytest_mnn_parity.core.tolerances import TIERS, tier_for

    tier = looser_tier(kind, "CPU", precision, ref)
    if ref is None:
        assert tier == kind  # no bundle: unchanged
        return
    order = ["fp32", "fp16", "bf16"]
    mine = kind if kind in TIERS else tier_for("CPU", precision)
    assert order.index(tier) == max(order.index(mine), order.index(ref))
