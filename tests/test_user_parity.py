"""The engine behind the user fixtures, without pytest in between, on real models; and marker logic."""
from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import COLLAPSE, DEMO, FIXTURES
from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.mnn.backends import DEFAULT_BACKENDS, PRECISIONS
from pytest_mnn_parity.mnn.model import ModelError
from pytest_mnn_parity.mnn.runner import reference_config, LoadedModel
from pytest_mnn_parity.plugin.user_markers import MarkerError, matrix_row, parity_spec, select, xfail_specs
from pytest_mnn_parity.engine.user_inputs import MnnInputError, MnnOutputs, MnnRunError, ModelUnderTest

# Where the engine runs the reference with the default --mnn-threads (4).
REFERENCE = reference_config(4)


@pytest.fixture(scope="module")
def engine():
    return ParityEngine(ParitySettings())


def lama_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((1, 3, 32, 32), dtype=np.float32),
            "mask": (rng.random((1, 1, 32, 32)) > 0.7).astype(np.float32)}


def test_run_reference_and_compare_on_the_tests_own_inputs(engine):
    mut = ModelUnderTest(engine, DEMO, label="demo")
    inputs = lama_inputs()
    out = mut.run(RunConfig("CPU", "low"), inputs)
    assert isinstance(out, MnnOutputs) and out.backend_used == "CPU" and out.config.id == "CPU-low"
    assert out["inpainted"].shape == (1, 3, 32, 32) and out.seconds > 0
    # The reference is exactly what a bare interpreter gives on the reference configuration.
    raw = LoadedModel(DEMO).run(REFERENCE, inputs).outputs["inpainted"]
    np.testing.assert_array_equal(mut.reference(inputs)["inpainted"], raw)
    result = mut.compare(out)
    # One tier rule with generated items: the measured arithmetic of CPU-low (fp32 on an x86 CPU).
    assert result.passed and result.message == ""
    assert result.tolerance.tier == engine.tolerance(RunConfig("CPU", "low")).tier
    assert result.outputs_dict()["inpainted"]["max_abs"] < 1e-5
    assert result.input_set.startswith("given by the test (") and result.trace is None


def test_reference_outputs_are_cached_per_input_data_and_handed_out_as_copies(engine):
    mut = ModelUnderTest(engine, DEMO)
    inputs = lama_inputs()
    first = mut.reference(inputs)
    first["inpainted"][...] = 0
    again = mut.reference({k: v.copy() for k, v in inputs.items()})
    assert np.any(again["inpainted"] != 0)
    assert len(mut._references) == 1
    other = mut.reference(lama_inputs(seed=1))
    assert len(mut._references) == 2 and not np.array_equal(other["inpainted"], again["inpainted"])
    # The run keeps its own copy of the inputs: the test may reuse its buffers.
    out = mut.run(RunConfig("CPU", "high"), inputs)
    inputs["image"][...] = 0
    assert np.any(out.inputs["image"] != 0)


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda i: {"image": i["image"]}, r"demo: missing input\(s\) \['mask'\]; the model's inputs are image 1x3x32x32 "
                                      r"float32, mask 1x1x32x32 float32"),
    (lambda i: {**i, "depth": i["mask"]}, r"unknown input\(s\) \['depth'\]"),
    (lambda i: i["image"], "got one array but the model has 2 inputs"),
    (lambda i: {**i, "mask": i["mask"][..., :16]}, r"input 'mask' has shape 1x1x32x16 but the model's sessions take "
                                                   r"1x1x32x32; .* --mnn-input-shape mask=1x1x32x16"),
    (lambda i: {**i, "image": i["image"].astype(str)}, "input 'image' is <U.*, not numbers"),
])
def test_bad_inputs_name_the_model_the_input_and_the_fix(engine, make, pattern):
    mut = ModelUnderTest(engine, DEMO, label="demo")
    with pytest.raises(MnnInputError, match=pattern):
        mut.run(RunConfig("CPU", "high"), make(lama_inputs()))


def test_float_data_for_an_int_input_is_refused(engine):
    mut = ModelUnderTest(engine, FIXTURES / "multi_io.mnn")
    good = {"features": np.ones((1, 16), np.float32), "ids": np.arange(4, dtype=np.int64).reshape(1, 4)}
    out = mut.run(RunConfig("CPU", "high"), good)
    np.testing.assert_array_equal(out["ids_out"], np.arange(1, 5).reshape(1, 4))
    with pytest.raises(MnnInputError, match=r"input 'ids' is float64 but the model takes int32 .*astype\(np.int32\)"):
        mut.run(RunConfig("CPU", "high"), {**good, "ids": good["ids"].astype(np.float64)})


def test_a_collapse_is_judged_and_traced_to_its_layer(engine):
    mut = ModelUnderTest(engine, COLLAPSE / "zero.fp16.mnn", COLLAPSE / "zero.mnn", reference_label="zero.mnn")
    image = np.random.default_rng(3).random((1, 3, 8, 8), dtype=np.float32)
    out = mut.run(RunConfig("CPU", "high"), image)
    result = mut.compare(out, reproduce="pytest 'x.py::t[CPU-high]'")
    assert result.category.value == "zero_output" and not result.passed
    assert result.first_divergent_layer["name"] == "tiny_conv"
    assert [r.kind for r in result.fp16_risks] == ["underflow"]
    assert result.message.startswith("zero_output on CPU-high: output 'out': every element is exactly 0")
    assert "reference: zero.mnn on CPU high, 4 threads" in result.message
    assert result.message.endswith("reproduce: pytest 'x.py::t[CPU-high]'")
    # Given plain dicts, the outputs' inputs are unknown: judged the same, but nothing to trace.
    plain = mut.compare(dict(out), dict(mut.reference(image)), config=RunConfig("CPU", "high"))
    assert plain.category.value == "zero_output" and plain.trace is None and plain.input_set == "given by the test"
    with pytest.raises(TypeError, match="needs the dict run\\(\\) returned"):
        mut.compare(dict(out), config=RunConfig("CPU", "high"))


def test_tolerance_layers_apply_in_order(engine):
    mut = ModelUnderTest(engine, COLLAPSE / "healthy.fp16.mnn", COLLAPSE / "healthy.mnn")
    out = mut.run(RunConfig("CPU", "high"), np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32))
    assert mut.compare(out).category.value == "mismatch"
    loose = mut.compare(out, tolerance_layers=[("ini", {"atol": 0.5}), ("marker mnn_parity", {"atol": 0.01,
                                                                                             "rtol": 0.01})])
    assert loose.passed and loose.tolerance.sources == ("ini", "marker mnn_parity") and loose.tolerance.atol == 0.01
    with pytest.raises(ValueError, match=r"mnn_parity call: unknown tolerance field\(s\) \['atoll'\]"):
        mut.compare(out, tolerance_layers=[("mnn_parity call", {"atoll": 1})])


def test_mnn_errors_are_raised_with_their_name(engine):
    mut = ModelUnderTest(engine, FIXTURES / "control_flow" / "if_branch.mnn", label="if_branch.mnn")
    with pytest.raises(MnnRunError, match=r"if_branch.mnn on CPU-high: runSession returned 3 \(COMPUTE_SIZE_ERROR\)"
                       ) as info:
        mut.run(RunConfig("CPU", "high"), np.ones((1, 3, 8, 8), np.float32))
    assert info.value.rc == 3 and info.value.category.value == "runtime_error"
    with pytest.raises(MnnRunError, match="METAL: not in this MNN build") as absent:
        ModelUnderTest(engine, DEMO).run(RunConfig("METAL", "high"), lama_inputs())
    assert absent.value.category.value == "backend_unavailable"


def test_a_reference_of_another_network_is_a_model_error(engine):
    mut = ModelUnderTest(engine, DEMO, FIXTURES / "multi_io.mnn")
    with pytest.raises(ModelError, match="differ from the reference model"):
        mut.reference(lama_inputs())


# -- marker logic -----------------------------------------------------------------

def test_markers_merge_closest_first_and_typos_are_errors():
    module = pytest.mark.mnn_parity("a.mnn", backends="CPU,OPENCL", atol=0.1).mark
    function = pytest.mark.mnn_parity(atol=0.2, precisions=["LOW", "high"]).mark
    spec = parity_spec([function, module], "t.py::test")
    assert (spec.model, spec.backends, spec.precisions, spec.tolerance) == (
        "a.mnn", ("CPU", "OPENCL"), ("low", "high"), (("atol", 0.2),))
    for mark, message in [(pytest.mark.mnn_parity(atoll=1).mark, r"unknown argument\(s\) \['atoll'\]"),
                          (pytest.mark.mnn_parity(backends="OPENCLL").mark, "unknown MNN backend 'OPENCLL'"),
                          (pytest.mark.mnn_parity(min_cosine=2).mark, "min_cosine must be at most 1"),
                          (pytest.mark.mnn_parity(precisions=[]).mark, "precisions is empty"),
                          (pytest.mark.mnn_parity("a", "b").mark, "at most one positional argument")]:
        with pytest.raises(MarkerError, match=r"@pytest.mark.mnn_parity on t.py::test: .*" + message):
            parity_spec([mark], "t.py::test")
    xfail = xfail_specs([pytest.mark.mnn_xfail(backend="cpu", precision=["low"], reason="r").mark], "w")[0]
    assert xfail.matches(RunConfig("CPU", "low")) and not xfail.matches(RunConfig("CPU", "high"))
    with pytest.raises(MarkerError, match=r"unknown argument\(s\) \['precisions'\]"):
        xfail_specs([pytest.mark.mnn_xfail(precisions="low").mark], "w")


_ID_PART = st.text(alphabet=string.ascii_letters + string.digits + "_.", min_size=1, max_size=8)
_CONFIG_IDS = [f"{b}-{p}" for b in DEFAULT_BACKENDS for p in PRECISIONS]


@given(name=_ID_PART, others=st.lists(_ID_PART, max_size=3), position=st.integers(0, 3),
       config_id=st.sampled_from(_CONFIG_IDS))
def test_matrix_row_removes_exactly_the_configuration_from_the_id(name, others, position, config_id):
    position = min(position, len(others))
    params = "-".join(others[:position] + [config_id] + others[position:])
    expected = f"tests/test_a.py::TestA::test_{name}" + (f"[{'-'.join(others)}]" if others else "")
    assert matrix_row(f"tests/test_a.py::TestA::test_{name}[{params}]", config_id) == expected


@given(wanted=st.none() | st.lists(st.sampled_from(DEFAULT_BACKENDS), unique=True, min_size=1),
       configured=st.lists(st.sampled_from(DEFAULT_BACKENDS), unique=True, min_size=1), narrowed=st.booleans())
def test_select_keeps_the_markers_order_and_only_narrows(wanted, configured, narrowed):
    chosen = select(wanted, configured, narrowed)
    if wanted is None:
        assert chosen == configured
    elif not narrowed:
        assert chosen == wanted
    else:
        assert chosen == [name for name in wanted if name in configured]
        assert set(chosen) <= set(configured)
