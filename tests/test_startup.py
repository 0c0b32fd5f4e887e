"""What the plugin costs a pytest run that checks no model: pytest imports it at every start-up (its ``pytest11``
entry point), so it must not import numpy, MNN, ONNX, ONNX Runtime, Pillow, hypothesis or the engine before a
model or a fixture needs them (issue 22).  Each run is a fresh interpreter: ``sys.modules`` of this one has them all."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import DEMO, plugin_env

# Third-party libraries the plugin brings in only when a model is checked, and the heaviest of its own modules.
HEAVY = ("numpy", "MNN", "_mnncengine", "onnx", "onnxruntime", "PIL", "hypothesis",
         "pytest_mnn_parity.engine.engine", "pytest_mnn_parity.isolation.engine", "pytest_mnn_parity.trace.compare",
         "pytest_mnn_parity.report.pictures", "pytest_mnn_parity.plugin.items")

PROBE = textwrap.dedent("""
    import json, sys
    import pytest
    code = pytest.main(sys.argv[2:])
    loaded = sorted(n for n in json.loads(sys.argv[1]) if n in sys.modules)
    plugin = "pytest_mnn_parity.plugin.hooks" in sys.modules
    print("PROBE", json.dumps({"code": int(code), "loaded": loaded, "plugin": plugin}))
""")


def loaded_after(args: list[str], cwd) -> dict:
    # hypothesis's own pytest plugin imports hypothesis at start-up; left out, so what is counted is ours.
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), "-p", "no:cacheprovider",
                          "-p", "no:hypothesispytest", *args], cwd=cwd, env=plugin_env(), capture_output=True, text=True,
                         timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, f"the probe printed nothing:\n{out.stdout}\n{out.stderr}"
    return json.loads(line[-1].removeprefix("PROBE "))


# "--version" twice: pytest then loads the plugins to list them (once, it prints its own version and stops).
@pytest.mark.parametrize("args", [["--version", "--version"], ["-q"]], ids=["version", "plain-tests"])
def test_a_run_without_models_imports_no_heavy_module(tmp_path, args):
    (tmp_path / "test_plain.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    probe = loaded_after(args, tmp_path)
    assert probe["plugin"], "the plugin was not loaded: the test would prove nothing"
    assert probe["code"] == 0
    # What pytest and the machine's other plugins import anyway (on the GPU machine one imports numpy) is not ours.
    without = loaded_after([*args, "-p", "no:mnn_parity"], tmp_path)
    assert not without["plugin"] and without["code"] == 0
    ours = sorted(set(probe["loaded"]) - set(without["loaded"]))
    assert ours == [], (f"pytest {' '.join(args)} with no --mnn-model imported {ours}: "
                        "import them where a model or fixture first needs them (docs/architecture.md)")


def test_checking_a_model_still_imports_what_it_needs(tmp_path):
    """The control: the same probe sees the engine once a model is checked, so the test above can fail."""
    probe = loaded_after(["-q", "--mnn-only", "--mnn-model", str(DEMO), "--mnn-backends", "CPU",
                          "--mnn-precisions", "high", "--mnn-isolate", "never"], tmp_path)
    assert probe["code"] == 0
    assert {"numpy", "MNN", "pytest_mnn_parity.engine.engine",
            "pytest_mnn_parity.plugin.items"} <= set(probe["loaded"])


# Taken before the first item's set-up (where a generated item makes its check) and at the end: what the pytest
# process imported to collect the model and start its isolated worker, and what it imported in all.
FIRST_CHECK = textwrap.dedent("""
    import json, sys
    import pytest
    heavy = json.loads(sys.argv[1])
    seen = []
    class Spy:
        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_setup(self, item):
            if not seen:
                seen.append(sorted(n for n in heavy if n in sys.modules))
    code = pytest.main(sys.argv[2:], plugins=[Spy()])
    print("PROBE", json.dumps({"code": int(code), "first_check": seen[0] if seen else None,
                               "end": sorted(n for n in heavy if n in sys.modules)}))
""")

# What only checking in-process needs: MNN, the engine and what it alone imports (its sides, the trace's comparison
# and capture, the failure messages).  numpy is still imported: the workers' answers are rebuilt into the result
# types (engine/results.py), whose modules compute with it.
IN_PROCESS_ONLY = ("MNN", "_mnncengine", "onnx", "onnxruntime", "PIL", "hypothesis",
                   "pytest_mnn_parity.engine.engine", "pytest_mnn_parity.engine.explain",
                   "pytest_mnn_parity.engine.onnx_side", "pytest_mnn_parity.engine.stream",
                   "pytest_mnn_parity.mnn.module_runner", "pytest_mnn_parity.trace.compare",
                   "pytest_mnn_parity.trace.capture", "pytest_mnn_parity.report.pictures")


def first_check(tmp_path, model, isolate: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FIRST_CHECK, json.dumps(IN_PROCESS_ONLY), "-p", "no:hypothesispytest",
                          "-q", "--mnn-only", "--mnn-model", str(model), "--mnn-backends", "CPU", "--mnn-precisions",
                          "high", "--mnn-isolate", isolate], cwd=tmp_path, env=plugin_env(), capture_output=True,
                         text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, f"the probe printed nothing:\n{out.stdout}\n{out.stderr}"
    probe = json.loads(line[-1].removeprefix("PROBE "))
    assert probe["code"] == 0, out.stdout
    return probe


def test_an_isolated_run_checks_without_the_in_process_engine(tmp_path):
    """With every configuration in a worker (the default) and backend discovery kept from an earlier run (pytest's
    cache; a first run probes the CPU in this process, which imports MNN), the pytest process reads the model's
    sidecar, makes its items, starts the worker and rebuilds its answers without importing MNN or the engine."""
    model = tmp_path / "demo.mnn"
    model.write_bytes(DEMO.read_bytes())
    # A sidecar's shapes reach the worker through the run's declarations, not through an engine.
    (tmp_path / "demo.mnn.toml").write_text('[shapes]\nimage = "1x3x32x32"\n')
    first_check(tmp_path, model, "auto")  # fills pytest's cache with the discovery
    probe = first_check(tmp_path, model, "auto")
    assert probe["first_check"] == [], f"before its first check the pytest process imported {probe['first_check']}"
    assert probe["end"] == [], f"an isolated run imported {probe['end']} in the pytest process"
    # The control: the same probe sees the engine and MNN where the check runs in this process.
    control = first_check(tmp_path, model, "never")
    assert {"MNN", "pytest_mnn_parity.engine.engine"} <= set(control["end"])
