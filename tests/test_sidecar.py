"""Sidecar validation: every mistake is caught before inference, naming the file, the key and the fix."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pytest_mnn_parity.inputs.sets import SidecarError
from pytest_mnn_parity.mnn.model import ModelError
from pytest_mnn_parity.mnn.runner import LoadedModel
from pytest_mnn_parity.inputs.sidecar import find_sidecar

from conftest import DEMO, FIXTURES

GOOD_MASK = 'mask = { mask = "m.png" }\n'


@pytest.fixture(scope="module")
def lama():
    return LoadedModel(DEMO)


@pytest.fixture
def folder(tmp_path):
    shutil.copyfile(DEMO, tmp_path / "lama.mnn")
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(tmp_path / "p.png")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a picture")
    (tmp_path / "cut.png").write_bytes((tmp_path / "p.png").read_bytes()[:60])
    np.save(tmp_path / "rank3.npy", np.zeros((3, 32, 32), dtype=np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 16, 16), dtype=np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 3, 32, 32)), b=np.zeros((1, 3, 32, 32)))
    return tmp_path


def validate(folder) -> None:
    """Everything a parity run checks before the model runs: the file, then each input set on the model."""
    model = LoadedModel(folder / "lama.mnn")
    sidecar = find_sidecar(folder / "lama.mnn", folder)
    sidecar.check_model(model)
    for input_set in sidecar.input_sets:
        input_set.build(model, 0)


CASES = {
    "toml syntax": ("[input_sets.a\nimage = 1\n", "not valid TOML", "fix the syntax"),
    "unknown top-level key": ("[inputs.a]\n", "unknown key 'inputs'", "known keys: shapes, input_sets"),
    "unknown input name": ('[input_sets.a]\nimag = { image = "p.png" }\n' + GOOD_MASK,
                           "[input_sets.a] imag: the model lama.mnn has no input 'imag'", "rename the key"),
    "input without a source": ('[input_sets.a]\nimage = { image = "p.png" }\n', "no source for input 'mask'",
                               'add mask = { generator = "uniform" }'),
    "missing image": ('[input_sets.a]\nimage = { image = "nope.png" }\n' + GOOD_MASK,
                      "[input_sets.a] image: no such image", "relative to the file"),
    "unreadable image": ('[input_sets.a]\nimage = { image = "bad.png" }\n' + GOOD_MASK,
                         "cannot read bad.png as an image", "save it as PNG"),
    "truncated image": ('[input_sets.a]\nimage = { image = "cut.png" }\n' + GOOD_MASK,
                        "cannot read cut.png as an image", "save it as PNG"),
    "wrong rank": ('[input_sets.a]\nimage = { array = "rank3.npy" }\n' + GOOD_MASK,
                   "rank3.npy has rank 3 (3x32x32) but input 'image' has rank 4", "model's input shape"),
    "shape mismatch": ('[input_sets.a]\nimage = { array = "wrong.npy" }\n' + GOOD_MASK,
                       "gives shape 1x3x16x16 but input 'image' of the model is 1x3x32x32", "[shapes]"),
    "image size without resize": ('[input_sets.a]\nimage = { image = "small.png", resize = false }\n' + GOOD_MASK,
                                  "image is 16x16 (WxH) but input 'image' needs 32x32", "remove resize = false"),
    "channels": ('[input_sets.a]\nimage = { image = "p.png", color = "GRAY" }\n' + GOOD_MASK,
                 "gives 1 channel(s) but input 'image' has 3", 'use color = "RGB"'),
    "dtype": ('[input_sets.a]\nimage = { image = "p.png", dtype = "uint8" }\n' + GOOD_MASK,
              "[input_sets.a] image.dtype: declared uint8 but input 'image' is float32", 'dtype = "float32"'),
    "npz without that member": ('[input_sets.a]\nimage = { array = "two.npz" }\n' + GOOD_MASK,
                                "two.npz has no array 'image' (it has ['a', 'b'])", 'key = "NAME"'),
    "unknown generator": ('[input_sets.a]\nimage = { generator = "gaussian" }\n' + GOOD_MASK,
                          "unknown generator 'gaussian'", "uniform, normal, constant, zeros"),
    "unknown source key": ('[input_sets.a]\nimage = { image = "p.png", colour = "RGB" }\n' + GOOD_MASK,
                           "unknown key(s) ['colour'] for a image source", "known keys: color"),
    "two kinds": ('[input_sets.a]\nimage = { image = "p.png", mask = "m.png" }\n' + GOOD_MASK,
                  "exactly one of image, mask, array, generator; found both image and mask", "e.g. image ="),
    "a string instead of a table": ('[input_sets.a]\nimage = "p.png"\n' + GOOD_MASK,
                                    "expected a table, got the string 'p.png'", 'image = { image = "p.png" }'),
    "empty range": ('[input_sets.a]\nimage = { generator = "uniform", low = 1, high = 1 }\n' + GOOD_MASK,
                    "uniform needs low < high", "widen the range"),
    "bad set name": ('[input_sets."a b"]\nimage = { image = "p.png" }\n' + GOOD_MASK,
                     "input set name 'a b' cannot be part of a test id", "letters, digits"),
    "bad shape": ('[shapes]\nimage = "1xAx3"\n', "[shapes] image: expected a shape of positive integers",
                  "image = [1, 3, 512, 512]"),
    "shape for an unknown input": ("[shapes]\npicture = [1, 3, 8, 8]\n", "[shapes] picture: the model lama.mnn has "
                                                                        "no input 'picture'", "rename the key"),
    "unknown output": ("[tolerance.outputs.out]\natol = 0.1\n", "[tolerance.outputs.out]: the model lama.mnn has no "
                                                               "output 'out' (its outputs: inpainted)", "name one"),
    "unknown tolerance field": ("[tolerance]\natoll = 0.1\n", "[tolerance] atoll: unknown tolerance field",
                                "known fields: atol, rtol"),
    "tolerance out of range": ("[tolerance.layers.dec_conv]\nmin_cosine = 2\n",
                               "[tolerance.layers.dec_conv] min_cosine: min_cosine must be at most 1", "docs/verdicts"),
    "xfail without reason": ('[[xfail]]\nprecision = "low"\n', "[xfail #1] reason: every xfail needs a reason",
                             'add reason = "'),
    "xfail precision": ('[[xfail]]\nprecision = "fp16"\nreason = "r"\n', "[xfail #1] precision: unknown MNN "
                                                                         "precision 'fp16'", "use one of"),
    "xfail input set": ('[[xfail]]\ninput_set = "photo9"\nreason = "r"\n', "no input set 'photo9' in this sidecar",
                        "name a declared input set"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mistake_names_the_file_the_key_and_the_fix(folder, case):
    text, reason, fix = CASES[case]
    (folder / "lama.mnn.toml").write_text(text)
    with pytest.raises(SidecarError) as info:
        validate(folder)
    message = str(info.value)
    assert message.startswith(str(folder / "lama.mnn.toml") + ": "), message
    assert reason in message, message
    assert "\n  fix: " in message and fix in message.split("fix: ", 1)[1], message


def test_pyproject_table_keys_are_named_in_errors_and_paths_are_relative_to_it(folder, lama):
    (folder / "models").mkdir()
    shutil.move(folder / "lama.mnn", folder / "models" / "lama.mnn")
    (folder / "pyproject.toml").write_text('[tool.mnn-parity.models."lama.mnn".input_sets.a]\n'
                                           'image = { image = "p.png" }\nmask = { mask = "nope.png" }\n')
    sidecar = find_sidecar(folder / "models" / "lama.mnn", folder)
    assert sidecar.file == folder / "pyproject.toml" and sidecar.source == "sidecar pyproject.toml"
    with pytest.raises(SidecarError, match=r'\[tool\.mnn-parity\.models\."lama\.mnn"\.input_sets\.a\] mask: '
                                           r"no such image .*nope\.png"):
        sidecar.input_sets[0].build(lama, 0)
    (folder / "pyproject.toml").write_text('[tool.mnn-parity.models."models/lama.mnn".input_sets.a]\n'
                                           'image = { image = "p.png" }\nmask = { mask = "m.png" }\n')
    a, _ = find_sidecar(folder / "models" / "lama.mnn", folder).input_sets[0].build(lama, 0)
    assert a["image"].shape == (1, 3, 32, 32)
    (folder / "models" / "lama.mnn.toml").write_text("")
    with pytest.raises(SidecarError, match="configured in 2 places") as info:
        find_sidecar(folder / "models" / "lama.mnn", folder)
    assert "keep one of them" in str(info.value)


def test_broken_input_set_is_kept_for_its_own_items_only(folder, lama):
    (folder / "lama.mnn.toml").write_text('[input_sets.good]\nimage = { image = "p.png" }\n' + GOOD_MASK
                                          + '[input_sets.broken]\nimage = { image = "nope.png" }\n' + GOOD_MASK)
    good, broken = find_sidecar(folder / "lama.mnn", folder).input_sets
    assert good.error is None and broken.error is not None
    good.build(lama, 0)
    with pytest.raises(ModelError, match="no such image"):
        broken.build(lama, 0)


def test_no_sidecar_means_none_and_the_shipped_sidecars_are_valid():
    assert find_sidecar(DEMO, FIXTURES.parent) is None
    for model in (FIXTURES / "inputs" / "lama_like.mnn", FIXTURES / "threshold" / "gate.fp16.mnn"):
        sidecar = find_sidecar(model, FIXTURES.parent)
        loaded = LoadedModel(model)
        sidecar.check_model(loaded)
        assert len(sidecar.input_sets) == 2
        for input_set in sidecar.input_sets:
            input_set.build(loaded, 0)
