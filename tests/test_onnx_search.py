"""The search behind ONNX localisation, as properties over random dataflow graphs.

The probes here are computed from a known truth (which nodes introduce an
error), so the search's answer can be checked exactly; the real probes
(conversions and ONNX Runtime) are exercised in test_onnx.py.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.core.metrics import compare
from pytest_mnn_parity.onnx.localise import MAX_PROBES, Graph, Node, evenly, search
from pytest_mnn_parity.trace.record import TensorJudgement

_METRICS = compare(np.ones(1), np.ones(1), atol=0, rtol=0)


def _judgement(bad: bool) -> TensorJudgement:
    return TensorJudgement(0, _METRICS, bad)


@st.composite
def graphs(draw):
    """A random DAG of single-output nodes over one graph input ``x``, and the truth about it."""
    n = draw(st.integers(2, 40))
    nodes = []
    for i in range(n):
        earlier = ["x"] + [f"t{j}" for j in range(i)]
        inputs = draw(st.lists(st.sampled_from(earlier), min_size=1, max_size=3, unique=True))
        nodes.append(Node(i, f"n{i}", "Op", tuple(inputs), (f"t{i}",)))
    # The last node reads the one before it, so the failing output has ancestors.
    nodes[-1] = Node(n - 1, f"n{n - 1}", "Op", tuple(dict.fromkeys(nodes[-1].inputs + (f"t{n - 2}",))), (f"t{n - 1}",))
    origins = set(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    hidden = set(draw(st.lists(st.integers(0, n - 2), max_size=5))) if draw(st.booleans()) else set()
    bad: dict[str, bool] = {"x": False}
    for node in nodes:
        bad[node.outputs[0]] = node.index in origins or any(bad[t] for t in node.inputs)
    graph = Graph(nodes, {f"t{i}": i for i in range(n)}, [f"t{i}" for i in range(n)])
    return graph, bad, {f"t{i}" for i in hidden}, origins


def _probe_for(bad, hidden, failing, calls):
    def probe(tensors):
        calls.append(list(tensors))
        out = {t: (None if t in hidden else _judgement(bad[t])) for t in tensors}
        out[failing] = _judgement(bad[failing])
        return out
    return probe


@settings(max_examples=120, deadline=None)
@given(graphs(), st.integers(1, 8))
def test_the_blamed_node_diverged_and_none_of_its_comparable_inputs_did(case, per_probe):
    graph, bad, hidden, origins = case
    failing = graph.candidates[-1]
    if not bad[failing]:
        return
    calls: list = []
    outcome = search(graph, failing, _probe_for(bad, hidden, failing, calls), per_probe)
    assert outcome.probes == len(calls) <= MAX_PROBES
    node = outcome.blamed
    assert node is not None
    assert bad[node.outputs[0]]
    assert not any(bad[t] for t in node.inputs if t in graph.producer and t not in hidden)
    if not hidden:
        assert node.index in origins  # a divergent node with healthy inputs introduced the error
    # Only what was asked for (and the failing output) is reported as judged.
    asked = {t for call in calls for t in call} | {failing}
    assert set(outcome.judged) <= asked


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 300), st.data())
def test_binary_search_on_a_chain_is_logarithmic(n, data):
    origin = data.draw(st.integers(0, n - 1))
    nodes = [Node(i, f"n{i}", "Op", ("x" if i == 0 else f"t{i - 1}",), (f"t{i}",)) for i in range(n)]
    graph = Graph(nodes, {f"t{i}": i for i in range(n)}, [f"t{i}" for i in range(n)])
    bad = {"x": False, **{f"t{i}": i >= origin for i in range(n)}}
    calls: list = []
    outcome = search(graph, f"t{n - 1}", _probe_for(bad, set(), f"t{n - 1}", calls), per_probe=1)
    assert outcome.blamed.index == origin
    assert outcome.probes <= math.ceil(math.log2(n)) + 2


def test_a_probe_that_does_not_reproduce_the_failure_blames_nothing():
    nodes = [Node(0, "a", "Conv", ("x",), ("t0",)), Node(1, "b", "Relu", ("t0",), ("t1",)),
             Node(2, "c", "Mul", ("t1",), ("t2",))]
    graph = Graph(nodes, {"t0": 0, "t1": 1, "t2": 2}, ["t0", "t1", "t2"])
    outcome = search(graph, "t2", lambda tensors: {**{t: _judgement(False) for t in tensors},
                                                   "t2": _judgement(False)})
    assert outcome.blamed is None and "no longer fails" in outcome.notes[0]


@given(st.lists(st.integers(), unique=True, max_size=60), st.integers(1, 10))
def test_evenly_spreads_k_items_in_order(items, k):
    picked = evenly(items, k)
    assert picked == sorted(picked, key=items.index) and set(picked) <= set(items)
    assert len(picked) == min(len(items), k)
    if len(items) > k:  # no stretch between picks (or the ends) longer than an even share
        positions = [-1] + [items.index(p) for p in picked] + [len(items)]
        assert max(b - a for a, b in zip(positions, positions[1:])) <= math.ceil(len(items) / (k + 1)) + 1
