"""The committed fixture models are exactly what the code in fixtures/ builds."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import FIXTURES

pytest.importorskip("onnx")


def _builder():
    spec = importlib.util.spec_from_file_location("build_fixtures", FIXTURES / "build_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rebuilding_the_fixtures_reproduces_the_committed_files_byte_for_byte(tmp_path):
    built = _builder().build_all(tmp_path)
    assert len(built) >= 19
    for path in sorted(tmp_path.rglob("*")):
        if path.suffix in (".mnn", ".onnx", ".pb"):
            committed = FIXTURES / path.relative_to(tmp_path)
            assert committed.is_file(), f"{committed} is built but not committed"
            assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from what build_fixtures.py makes"


def test_rebuilt_pictures_and_sidecars_match_the_committed_ones(tmp_path):
    """PNGs by pixels (their bytes depend on the zlib version), sidecars byte for byte."""
    from PIL import Image
    import numpy as np

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "lama_like.mnn").write_bytes((FIXTURES / "demo" / "lama_like.mnn").read_bytes())
    built = _builder().build_inputs(tmp_path)
    assert {"inputs/photo1.png", "inputs/lama_like.mnn.toml", "threshold/gate.fp16.mnn.toml"} <= set(built)
    for key, path in built.items():
        committed = FIXTURES / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is built but not committed"
        if path.suffix == ".png":
            with Image.open(path) as new, Image.open(committed) as old:
                assert new.mode == old.mode and np.array_equal(np.asarray(new), np.asarray(old)), committed
        else:
            assert committed.read_bytes() == path.read_bytes(), f"{committed} differs from what build_fixtures.py makes"
