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
    assert probe["loaded"] == [], (f"pytest {' '.join(args)} with no --mnn-model imported {probe['loaded']}: "
                                   "import them where a model or fixture first needs them (docs/architecture.md)")


def test_checking_a_model_still_imports_what_it_needs(tmp_path):
    """The control: the same probe sees the engine once a model is checked, so the test above can fail."""
    probe = loaded_after(["-q", "--mnn-only", "--mnn-model", str(DEMO), "--mnn-backends", "CPU",
                          "--mnn-precisions", "high", "--mnn-isolate", "never"], tmp_path)
    assert probe["code"] == 0
    assert {"numpy", "MNN", "pytest_mnn_parity.engine.engine",
            "pytest_mnn_parity.plugin.items"} <= set(probe["loaded"])
