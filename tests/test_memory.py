"""A pytest process holds at most the models it is running (issue 22): two pytest-xdist workers on large models
were OOM-killed at 13 and 18.5 GB resident, each keeping every model it had touched."""
from __future__ import annotations

import json

from conftest import read_report

# Written into the pytester directory: at every item's setup and after its teardown, which models the run's
# engine holds, one JSON line per event in a file per process.
HELD_PROBE = '''
import json, os
import pytest
from pytest_mnn_parity.plugin.state import PARITY_RUN

def _note(item, when):
    run = item.config.stash[PARITY_RUN]
    held = sorted(p.name for p in run.engine.held_models()) if run.made("engine") else []
    name = getattr(item.config, "workerinput", {}).get("workerid", "main")
    with open(f"held-{name}.jsonl", "a") as f:
        f.write(json.dumps({"item": item.nodeid, "when": when, "held": held}) + "\\n")

def pytest_runtest_setup(item):
    _note(item, "setup")

@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _note(item, "after")
'''

ARGS = ("--mnn-only", "--mnn-backends", "CPU", "--mnn-precisions", "high,low", "--mnn-isolate", "never",
        "--mnn-report", "r.json")


def events(pytester) -> dict[str, list[dict]]:
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in pytester.path.glob("held-*.jsonl")}


def test_a_model_is_let_go_when_its_items_are_done(pytester, models):
    models("demo/lama_like.mnn", "multi_io.mnn")
    pytester.makeconftest(HELD_PROBE)
    result = pytester.runpytest(*ARGS, "--mnn-model", "lama_like.mnn", "--mnn-model", "multi_io.mnn")
    result.assert_outcomes(passed=4)
    seen = events(pytester)["held-main"]
    # While a model's items run, it is held; after its last item, nothing is.
    assert [e["held"] for e in seen if e["when"] == "after"] == [["lama_like.mnn"], [], ["multi_io.mnn"], []]
    assert all(len(e["held"]) <= 1 for e in seen)


def test_an_xdist_worker_holds_only_the_model_it_is_running(pytester, models):
    """Under pytest-xdist (plain ``-n 2``, docs/ci.md) a worker runs only some of each model's items, so it cannot
    count them down; it lets a model go when its next item is another model's.  Each worker's peak RSS is in the
    report."""
    models("demo/lama_like.mnn", "multi_io.mnn")
    pytester.makeconftest(HELD_PROBE)
    result = pytester.runpytest_subprocess(*ARGS, "-n", "2", "--mnn-model", "lama_like.mnn",
                                           "--mnn-model", "multi_io.mnn")
    result.assert_outcomes(passed=4)
    by_worker = events(pytester)
    assert set(by_worker) == {"held-gw0", "held-gw1"}
    for name, seen in by_worker.items():
        for e in seen:
            assert len(e["held"]) <= 1, (name, e)  # never a model it is not running
        assert seen[-1]["held"] == [], (name, seen[-1])  # and none after its last item
    report = read_report(pytester.path / "r.json")
    assert set(report["peak_rss_mb"]) == {"gw0", "gw1"} and all(v > 0 for v in report["peak_rss_mb"].values())
    assert {r["process"]["xdist_worker"] for r in report["results"]} == {"gw0", "gw1"}
