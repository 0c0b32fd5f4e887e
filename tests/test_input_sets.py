"""Input sets from real files: PNGs written here with Pillow, .npy/.npz, generators; run on real models."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pytest_mnn_parity.inputs.sets import InputSet, Where, mirror, parse_source
from pytest_mnn_parity.inputs.generate import generate_inputs
from pytest_mnn_parity.engine.engine import ParityEngine
from pytest_mnn_parity.engine.results import ParitySettings
from pytest_mnn_parity.mnn.runner import LoadedModel, RunConfig
from pytest_mnn_parity.inputs.sidecar import find_sidecar
from pytest_mnn_parity.inputs.sources import Target
from pytest_mnn_parity.core.verdict import Category

from conftest import COLLAPSE, DEMO, FIXTURES

F32 = np.dtype(np.float32)


def png(path, pixels: np.ndarray):
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def source(tmp_path, **table):
    return parse_source(table, Where(tmp_path / "m.mnn.toml", "input_sets.s", "x"), tmp_path)


@pytest.fixture(scope="module")
def lama():
    return LoadedModel(DEMO)


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, size=(4, 6, 3)).astype(np.uint8)  # H=4, W=6, RGB


# -- sources ------------------------------------------------------------------------


def test_image_rgb_scaled_and_normalised_in_nchw(tmp_path, pixels):
    png(tmp_path / "p.png", pixels)
    src = source(tmp_path, image="p.png", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    arr = src.load(Target("x", (2, 3, 4, 6), F32, "NCHW"), 0)
    expected = (pixels / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]
    assert arr.dtype == F32 and arr.shape == (2, 3, 4, 6)
    np.testing.assert_allclose(arr[1], expected.transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_array_equal(arr[0], arr[1])  # the batch repeats the picture


def test_image_bgr_nhwc_and_raw_uint8(tmp_path, pixels):
    png(tmp_path / "p.png", pixels)
    bgr = source(tmp_path, image="p.png", color="BGR", layout="NHWC", scale=1.0)
    arr = bgr.load(Target("x", (1, 4, 6, 3), F32, "NHWC"), 0)
    np.testing.assert_array_equal(arr[0], pixels[..., ::-1].astype(np.float32))
    raw = source(tmp_path, image="p.png", dtype="uint8").load(Target("x", (1, 3, 4, 6), np.dtype(np.uint8), "NCHW"), 0)
    np.testing.assert_array_equal(raw[0], pixels.transpose(2, 0, 1))  # integer inputs get raw pixel values


def test_gray_image_and_nearest_resize(tmp_path):
    blocks = np.kron(np.array([[10, 200], [90, 250]]), np.ones((4, 4))).astype(np.uint8)  # 8x8, 2x2 blocks of 4
    png(tmp_path / "g.png", blocks)
    src = source(tmp_path, image="g.png", color="GRAY", resample="nearest", scale=1.0)
    arr = src.load(Target("x", (1, 1, 2, 2), F32, "NCHW"), 0)
    np.testing.assert_array_equal(arr[0, 0], [[10, 200], [90, 250]])


def test_mask_is_binarised_at_the_threshold_and_can_be_inverted(tmp_path):
    gray = np.array([[0, 100, 127, 128, 200, 255]], dtype=np.uint8)
    png(tmp_path / "m.png", gray)
    target = Target("mask", (1, 2, 1, 6), F32, "NCHW")
    mask = source(tmp_path, mask="m.png").load(target, 0)
    np.testing.assert_array_equal(mask[0, 0, 0], [0, 0, 0, 1, 1, 1])  # 128/255 >= 0.5 > 127/255
    np.testing.assert_array_equal(mask[0, 1], mask[0, 0])  # every channel gets the mask
    inverted = source(tmp_path, mask="m.png", threshold=0.7, invert=True).load(target, 0)
    np.testing.assert_array_equal(inverted[0, 0, 0], [1, 1, 1, 1, 0, 0])


def test_npy_and_npz_members(tmp_path):
    a, b = np.arange(6.0).reshape(1, 6), np.ones((1, 6))
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "ab.npz", x=a, other=b)
    t = Target("x", (1, 6), F32, "NCHW")
    np.testing.assert_array_equal(source(tmp_path, array="a.npy").load(t, 0), a)
    np.testing.assert_array_equal(source(tmp_path, array="ab.npz").load(t, 0), a)  # the member named like the input
    np.testing.assert_array_equal(source(tmp_path, array="ab.npz", key="other").load(t, 0), b)


def test_generators_ranges_and_determinism(tmp_path):
    t = Target("x", (1, 3, 16, 16), F32, "NCHW")
    uniform = source(tmp_path, generator="uniform", low=-2.0, high=-1.0)
    arr = uniform.load(t, 5)
    assert -2.0 <= arr.min() and arr.max() < -1.0 and arr.std() > 0.2
    np.testing.assert_array_equal(arr, uniform.load(t, 5))
    assert not np.array_equal(arr, uniform.load(t, 6))
    normal = source(tmp_path, generator="normal", mean=3.0, std=0.5).load(t, 0)
    assert abs(normal.mean() - 3.0) < 0.1 and abs(normal.std() - 0.5) < 0.1
    assert (source(tmp_path, generator="constant", value=0.25).load(t, 0) == 0.25).all()
    assert not source(tmp_path, generator="zeros").load(t, 0).any()
    ints = source(tmp_path, generator="uniform", low=2, high=5).load(Target("i", (1, 64), np.dtype(np.int32), ""), 0)
    assert ints.dtype == np.int32 and set(np.unique(ints)) == {2, 3, 4}


def test_default_uniform_generator_reproduces_the_seeded_inputs(lama):
    sources = {s.name: source(FIXTURES, generator="uniform") for s in lama.info.inputs}
    a, _ = InputSet("g", sources).build(lama, 7)
    seeded = generate_inputs(lama.info.inputs, lama.shapes, 7)
    for name in a:
        np.testing.assert_array_equal(a[name], seeded[name])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["NCHW", "NHWC"]), st.data())
def test_b_is_a_mirrored_and_image_and_mask_stay_aligned(c, h, w, layout, data):
    shape = (1, c, h, w) if layout == "NCHW" else (1, h, w, c)
    image = data.draw(st.lists(st.floats(0, 1), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    image = np.array(image).reshape(shape)
    mask = (image > 0.5).astype(float)
    np.testing.assert_array_equal(mirror(mirror(image, layout), layout), image)
    np.testing.assert_array_equal(mirror(image, layout) * mirror(mask, layout), mirror(image * mask, layout))
    assert mirror(image, layout).mean() == pytest.approx(image.mean())  # same brightness
    width_axis = 3 if layout == "NCHW" else 2
    np.testing.assert_array_equal(mirror(image, layout).take(0, axis=width_axis), image.take(-1, axis=width_axis))


# -- the shipped sidecar on the real demo model ---------------------------------------


def test_two_input_sets_on_the_lama_demo_have_their_own_reference():
    sidecar = find_sidecar(FIXTURES / "inputs" / "lama_like.mnn", FIXTURES.parent)
    assert [s.name for s in sidecar.input_sets] == ["photo1", "photo2"]
    engine = ParityEngine()
    path = FIXTURES / "inputs" / "lama_like.mnn"
    results = {s.name: engine.check(path, RunConfig("CPU", "low"), input_set=s) for s in sidecar.input_sets}
    for name, result in results.items():
        assert result.category is Category.OK, result.message
        assert result.input_set == name and "photo" in result.input_detail and "mask" in result.input_detail
    model = engine.model(path)
    ref1, ref2 = (engine.reference(model, s).outputs_a["inpainted"] for s in sidecar.input_sets)
    assert not np.allclose(ref1, ref2)
    image, mask = engine.inputs(model, sidecar.input_sets[0])[0].values()
    assert image.shape == (1, 3, 32, 32) and set(np.unique(mask)) == {0.0, 1.0}
    assert mask.mean() == pytest.approx(100 / 1024)  # mask1.png: a 10x10 box on 32x32


def test_sidecar_shapes_make_a_dynamic_model_run(tmp_path):
    shutil.copyfile(FIXTURES / "dynamic" / "dynamic_hw.mnn", tmp_path / "d.mnn")
    (tmp_path / "d.mnn.toml").write_text('[shapes]\nimage = [1, 3, 12, 20]\n[input_sets.flat]\n'
                                         'image = { generator = "constant", value = 0.5 }\n')
    sidecar = find_sidecar(tmp_path / "d.mnn", tmp_path)
    engine = ParityEngine()
    engine.set_input_shapes(tmp_path / "d.mnn", sidecar.shapes, "d.mnn.toml [shapes]")
    result = engine.check(tmp_path / "d.mnn", RunConfig("CPU", "high"), input_set=sidecar.input_sets[0])
    assert result.category is Category.OK, result.message
    assert result.verdict.outputs[0].metrics.shape == (1, 8, 12, 20)
    engine.set_input_shapes(tmp_path / "d.mnn", {"image": (3, 12, 20)}, "d.mnn.toml [shapes]")
    bad = engine.check(tmp_path / "d.mnn", RunConfig("CPU", "high"))
    assert bad.category is Category.MODEL_ERROR
    assert "d.mnn.toml [shapes] image=3x12x20 has rank 3" in bad.message and "give 4 dimensions" in bad.message


def test_per_output_tolerance_override_is_named_in_the_verdict():
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "healthy.mnn")))
    config = RunConfig("CPU", "high")
    strict = engine.check(COLLAPSE / "healthy.fp16.mnn", config)
    assert strict.category is Category.MISMATCH
    own = [("sidecar h.toml outputs.out", {"atol": 0.01, "rtol": 0.01})]
    loose = engine.check(COLLAPSE / "healthy.fp16.mnn", config, output_tolerances={"out": own})
    assert loose.category is Category.OK, loose.message
    assert loose.tolerance.tier == "fp32" and not loose.tolerance.sources  # the model's tolerance is untouched
    out = loose.outputs_dict()["out"]
    assert out["tolerance"]["atol"] == 0.01 and out["tolerance"]["sources"] == ["sidecar h.toml outputs.out"]


def test_per_layer_tolerance_override_changes_which_layer_is_blamed():
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "zero.mnn")))
    config = RunConfig("CPU", "high")
    plain = engine.check(COLLAPSE / "zero.fp16.mnn", config)
    assert plain.first_divergent_layer["name"] == "tiny_conv"
    forgiving = [("sidecar", {"atol": 1.0, "min_cosine": 0.0, "partial_zero_fraction": 1.0})]
    traced = engine.check(COLLAPSE / "zero.fp16.mnn", config, layer_tolerances={"tiny_conv": forgiving})
    layers = {layer.name: layer for layer in traced.trace.layers}
    assert not layers["tiny_conv"].failed and plain.trace.layers[1].failed
    assert traced.first_divergent_layer["name"] != "tiny_conv"
    assert traced.category is Category.ZERO_OUTPUT  # outputs are judged as before
