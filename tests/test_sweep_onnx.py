"""The op sweep of models judged against ONNX Runtime: each ONNX node cut alone from the source ONNX model.

onnx/sweep_broken.onnx is the ONNX source of sweep/broken.mnn: six healthy 3x3 convolutions, then tiny_conv
(1x1, weights around 1e-8) and a gain.  Its --fp16 conversion flushes tiny_conv's weights to zero, and truncates
every encoder weight a little in one direction.  Judged at the fp32 tier's numbers (the fp16 variant's own tier
has an absolute floor of 1e-3, above this output's whole range), the localisation blames enc4_conv, where the
rounding adds up past tolerance, and never probes tiny_conv: only running each node alone proves which is broken.
"""
from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from conftest import FIXTURES, read_report, results_by_nodeid
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import RunConfig
from pytest_mnn_parity.onnx.sweep import METHOD, live_tensors, one_node_model
from pytest_mnn_parity.onnx.variants import ConversionCache

ONNX = FIXTURES / "onnx"
CPU_LOW = RunConfig("CPU", "low")
STRICT = {"atol": 5e-4, "rtol": 1e-3, "abs_floor": 1e-6}
STRICT_FLAGS = ("--mnn-atol", "5e-4", "--mnn-rtol", "1e-3", "--mnn-abs-floor", "1e-6")


@pytest.fixture(scope="module")
def broken():
    engine = ParityEngine(ParitySettings(op_sweep="flagged"))
    return engine.check(ONNX / "sweep_broken.onnx", CPU_LOW, variant="fp16",
                        tolerance_layers=[("command line", STRICT)])


def test_the_node_broken_alone_replaces_the_localisations_blame(broken):
    swept = broken.op_sweep
    assert broken.category.value == "zero_output"
    assert swept.method.startswith(METHOD) and swept.note == ""
    assert broken.trace.blamed.name == swept.trace_blamed == "enc4_conv"
    rows = {row.op: row for row in swept.rows}
    # Flagged: the nodes from the blame to the failing output, not the healthy ones before it.
    assert list(rows) == ["enc4_conv", "enc4_relu", "enc5_conv", "enc5_relu", "tiny_conv", "gain_mul"]
    assert swept.culprit is rows["tiny_conv"]
    tiny = rows["tiny_conv"]
    assert (tiny.verdict, tiny.category, tiny.cosine, tiny.cut) == ("broken", "zero_output", 0.0, "onnx-node")
    assert tiny.outside_fraction > 0.99 and tiny.in_graph["health"] == ["zero"]
    # The blamed conv is right alone with ONNX Runtime's inputs: its error in the graph is the encoders' rounding.
    assert rows["enc4_conv"].verdict == "accumulated" and rows["enc4_conv"].category == "ok"
    assert rows["enc4_conv"].max_abs < 1e-3
    assert rows["gain_mul"].verdict == "upstream" and rows["gain_mul"].max_abs == 0  # exact alone, zeros in
    assert broken.first_divergent_layer["name"] == "tiny_conv"
    assert broken.first_divergent_layer["proven_by"] == "op sweep"
    assert broken.first_divergent_layer["trace_guess"] == "enc4_conv"
    message = broken.message
    assert "broken op: tiny_conv (Conv, #" in message and "[zero_output alone]" in message
    assert "first out of tolerance in the graph: enc4_conv (Conv, #" in message
    assert "the op sweep finds it accumulated" in message and "<- broken alone (op sweep)" in message


def test_all_sweeps_every_node_of_a_healthy_onnx_model():
    engine = ParityEngine(ParitySettings(op_sweep="all"))
    result = engine.check(ONNX / "collapse_healthy.onnx", CPU_LOW, variant="fp32")
    assert result.passed
    nodes = [node.name or node.output[0] for node in onnx.load(str(ONNX / "collapse_healthy.onnx")).graph.node]
    swept = result.op_sweep
    assert [row.op for row in swept.rows] == nodes
    assert {row.verdict for row in swept.rows} == {"ok"} and swept.culprit is None
    assert all(row.in_graph is not None and not row.in_graph["failed"] for row in swept.rows)
    assert all(row.max_abs < 1e-5 for row in swept.rows)
    # Two ReLUs of one shape are one cut: converted once.
    assert [row.cut for row in swept.rows].count("cached") >= 1 and swept.cuts < len(nodes)


def test_a_control_flow_node_is_not_cut_and_says_why():
    model = onnx.load(str(ONNX / "if_branch.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "If")
    reason = one_node_model(model, node, {}, live_tensors(model))
    assert isinstance(reason, str) and reason.startswith("a control-flow node (If)")


def test_onnx_op_sweep_reports_terminal_json_and_a_repro_that_runs(pytester, models):
    models("onnx/sweep_broken.onnx")
    result = pytester.runpytest("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "low", "--mnn-convert",
                                "fp16", *STRICT_FLAGS, "--mnn-model", "sweep_broken.onnx", "--mnn-op-sweep",
                                "--mnn-report", "r.json", "--mnn-repro", "repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*sweep_broken.onnx*enc4_conv*Conv*CPU-low*ok*FAIL*accumulated",
                                 "*sweep_broken.onnx*tiny_conv*Conv*CPU-low*zero_output*zero*broken",
                                 "*sweep_broken.onnx CPU-low: broken op: tiny_conv (Conv) is wrong alone*"])
    rec = results_by_nodeid(read_report(pytester.path / "r.json"))["sweep_broken.onnx::parity[fp16-CPU-low]"]
    swept = rec["op_sweep"]
    assert swept["broken_op"] == {"name": "tiny_conv", "type": "Conv", "occurrence": 0, "category": "zero_output"}
    assert swept["method"].startswith(METHOD) and swept["trace_blamed"] == "enc4_conv"
    assert {row["verdict"] for row in swept["rows"]} == {"broken", "accumulated", "upstream"}
    assert rec["first_divergent_layer"]["name"] == "tiny_conv"
    folder = pytester.path / "repro" / "sweep_broken.onnx-fp16-CPU-low"
    assert rec["repro"]["dir"] == str(folder) and rec["repro"]["what"].startswith("the node tiny_conv (Conv) alone")
    assert sorted(p.name for p in folder.iterdir()) == ["ISSUE.md", "expected.npz", "inputs.npz", "model.mnn",
                                                        "model.onnx", "repro.py"]
    cut = onnx.load(str(folder / "model.onnx"))
    assert [n.op_type for n in cut.graph.node] == ["Conv"] and [i.name for i in cut.graph.input] == ["in0"]
    assert "converted by MNNConvert (--fp16)" in (folder / "ISSUE.md").read_text()
    failing = subprocess.run([sys.executable, "repro.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "out0: max|d| 4.892e-08  cosine 0.000000  outside 99.90%  -> outside fraction  FAIL" in failing.stdout
    # The same one-node ONNX graph converted without --fp16: the script passes on the same inputs.
    fp32 = ConversionCache(pytester.path / "conv").convert_with(folder / "model.onnx", (), "fp32")
    (folder / "model.mnn").write_bytes(fp32.read_bytes())
    passing = subprocess.run([sys.executable, "repro.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert passing.returncode == 0, passing.stdout + passing.stderr


def test_a_given_mnn_against_its_onnx_says_a_sweep_without_its_flags_proves_nothing():
    # broken.fp16.mnn was made with --fp16, which the run cannot know: its nodes are converted without it.
    engine = ParityEngine(ParitySettings(op_sweep="flagged", reference=str(ONNX / "sweep_broken.onnx")))
    result = engine.check(FIXTURES / "sweep" / "broken.fp16.mnn", CPU_LOW)
    assert result.category.value == "zero_output"
    swept = result.op_sweep
    assert swept.culprit is None and swept.rows and "without variant flags" in swept.method
    assert swept.note.startswith("not proven: no op is wrong alone")
    assert "--mnn-model " + str(ONNX / "sweep_broken.onnx") + " --mnn-convert <variant>" in result.message
