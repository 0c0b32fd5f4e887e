"""The exported hypothesis strategies draw what the model accepts, within what the input set declares."""
from __future__ import annotations

import numpy as np
import pytest
from random import Random

from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from pytest_mnn_parity.inputs.sets import InputSet, Where, parse_source
from pytest_mnn_parity.mnn.runner import LoadedModel
from pytest_mnn_parity.inputs.sources import Target
from pytest_mnn_parity.inputs.strategies import float_arrays, int_arrays, masks, mnn_inputs, source_arrays, unit_images

from conftest import DEMO, FIXTURES

FAST = settings(max_examples=30, deadline=None)
LAMA = LoadedModel(DEMO)
MULTI = LoadedModel(FIXTURES / "multi_io.mnn")


def _source(**table):
    return parse_source(table, Where(FIXTURES / "x.toml", "input_sets.s", "x"), FIXTURES)


@FAST
@given(mnn_inputs(LAMA))
def test_default_draws_match_the_model_images_in_range_masks_binary(inputs):
    assert inputs.keys() == {"image", "mask"}
    assert inputs["image"].shape == (1, 3, 32, 32) and inputs["image"].dtype == np.float32
    assert 0.0 <= inputs["image"].min() and inputs["image"].max() <= 1.0
    assert set(np.unique(inputs["mask"])) <= {0.0, 1.0}  # "mask" in the name: rectangles of 1 on 0


@FAST
@given(mnn_inputs(MULTI))
def test_integer_inputs_stay_in_the_default_index_range(inputs):
    assert inputs["ids"].dtype == np.int32 and inputs["ids"].shape == (1, 4)
    assert 0 <= inputs["ids"].min() and inputs["ids"].max() < 8
    assert inputs["features"].shape == (1, 16)


GENERATED = InputSet("g", {"image": _source(generator="uniform", low=-1.0, high=3.0),
                           "mask": _source(generator="constant", value=0.25)})


@FAST
@given(mnn_inputs(LAMA, GENERATED))
def test_generator_ranges_bound_the_draws_and_constants_stay_fixed(inputs):
    assert -1.0 <= inputs["image"].min() and inputs["image"].max() <= 3.0
    assert (inputs["mask"] == 0.25).all()



@FAST
@given(mnn_inputs(FIXTURES / "inputs" / "lama_like.mnn", "photo1"))
def test_a_named_image_set_draws_pictures_through_the_same_normalisation(inputs):
    image = inputs["image"]
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image * 255.0, np.rint(image * 255.0), atol=1e-3)  # whole pixel values / 255
    assert set(np.unique(inputs["mask"])) <= {0.0, 1.0}


def test_an_unknown_input_set_name_says_where_sets_live():
    with pytest.raises(ValueError, match="no input set 'photo9'.*lama_like.mnn.toml"):
        mnn_inputs(FIXTURES / "inputs" / "lama_like.mnn", "photo9")


@FAST
@given(st.data())
def test_nhwc_targets_are_drawn_in_their_layout(data):
    target = Target("image", (1, 5, 7, 3), np.dtype(np.float32), "NHWC")
    image = data.draw(source_arrays(None, target))
    mask = data.draw(source_arrays(_source(mask="inputs/mask1.png"), Target("m", (1, 5, 7, 1), target.dtype, "NHWC")))
    assert image.shape == (1, 5, 7, 3) and mask.shape == (1, 5, 7, 1)


@FAST
@given(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda shape: st.tuples(st.just(shape), unit_images(shape), masks(shape))))
def test_building_blocks_keep_shape_and_range(drawn):
    shape, image, mask = drawn
    assert image.shape == shape == mask.shape
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple).flatmap(
    lambda shape: st.tuples(float_arrays(shape), int_arrays(shape, -3, 4))))
def test_flat_and_integer_arrays_keep_their_range(drawn):
    floats, ints = drawn
    assert floats.shape == ints.shape
    assert 0.0 <= floats.min() and floats.max() <= 1.0
    assert -3 <= ints.min() and ints.max() < 4


@pytest.mark.parametrize(("strategy", "reached"), [
    (unit_images((1, 3, 8, 8)), lambda image: (image == 1.0).all()),  # saturated white
    (unit_images((1, 3, 8, 8)), lambda image: (image == 0.0).all()),  # black
    (unit_images((1, 3, 8, 8)), lambda image: len(np.unique(image)) == 2),  # two flat regions
    (masks((1, 1, 8, 8)), lambda mask: mask.all()),  # full mask
    (masks((1, 1, 8, 8)), lambda mask: 0.3 < mask.mean() < 0.7),  # half masked
], ids=["white", "black", "two-regions", "full-mask", "half-mask"])
def test_the_search_space_reaches_what_breaks_image_models(strategy, reached):
    found = find(strategy, reached, settings=settings(max_examples=200, database=None, phases=[Phase.generate]),
                 random=Random(0))
    assert reached(found)
