"""Pictures, the HTML report and its rendering in a browser, on real runs of the fixture models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from conftest import COLLAPSE, DEMO, FIXTURES
from pytest_mnn_parity import ParityEngine, ParitySettings, RunConfig
from pytest_mnn_parity.report.artifacts import ArtifactWriter, item_folder, safe_name
from pytest_mnn_parity.report.html import render, result_id, write_html
from pytest_mnn_parity.report.pictures import (_LUT, BOTH_ZERO, NEW_ZERO, NON_FINITE, error_heatmap, image_layout,
                                        zero_nan_mask)
from pytest_mnn_parity.core.files import json_safe
from pytest_mnn_parity.report.records import build_report, record

PARTIAL = "partial_zero.fp16.mnn"


def _check(engine, writer, path, config, nodeid):
    writer.label = nodeid
    result = engine.check(path, config)
    result.model = nodeid.split("::")[0]
    outcome = "passed" if result.passed else ("skipped" if result.skipped else "failed")
    return result, record(nodeid, result, outcome)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run: the partial_zero fp16 build against its fp32 build (fails), the demo and
    multi_io against themselves with pictures of every output (passes), written and rendered."""
    root = tmp_path_factory.mktemp("reports")
    art = root / "art"
    failing = ArtifactWriter(art)
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "partial_zero.mnn"), output_sink=failing))
    results, records = {}, []
    for precision in ("high", "low"):
        nodeid = f"{PARTIAL}::parity[CPU-{precision}]"
        results[nodeid], rec = _check(engine, failing, COLLAPSE / PARTIAL, RunConfig("CPU", precision), nodeid)
        records.append(rec)
    always = ArtifactWriter(art, "always")
    healthy = ParityEngine(ParitySettings(output_sink=always, layers="always"))
    for path in (DEMO, FIXTURES / "multi_io.mnn"):
        nodeid = f"{path.name}::parity[CPU-low]"
        results[nodeid], rec = _check(healthy, always, path, RunConfig("CPU", "low"), nodeid)
        records.append(rec)
    settings_ = {"backends": ["CPU"], "precisions": ["normal", "high", "low", "Low_BF16"], "reference": "cpu",
                 "seed": 0, "layers": "on-failure", "artifacts": {"dir": str(art), "when": "on-failure"}}
    data = json_safe(build_report(records, mnn_version="3.6.1", settings=settings_, backends={}))
    html = root / "report.html"
    write_html(html, data, art)
    return SimpleNamespace(root=root, art=art, results=results, records={r["nodeid"]: r for r in records},
                           data=data, html=html)


def _tile(image: Image.Image, layout, index: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").crop(layout.tile_box(index)))


def _colours(pixels: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(c) for c in p) for p in pixels.reshape(-1, pixels.shape[-1])}


# -- pictures of a real collapse, checked by their pixels ---------------------------------------------

def test_zero_mask_shows_exactly_the_channels_that_collapsed(run):
    rec = run.records[f"{PARTIAL}::parity[CPU-high]"]
    assert rec["category"] == "partial_zero"
    info = rec["artifacts"]["outputs"]["out"]
    assert info["image_like"] and info["layout"] == "1x8x8x8 read as NCHW, 8 channel tiles"
    mask = Image.open(run.art / info["mask"])
    layout = image_layout((1, 8, 8, 8))
    for channel in range(8):
        colours = _colours(_tile(mask, layout, channel))
        if channel >= 4:  # the fp16 build flushed these channels' weights: every pixel became exactly 0
            assert colours == {NEW_ZERO}, channel
        else:
            assert NEW_ZERO not in colours and NON_FINITE not in colours, channel


def test_target_picture_goes_flat_where_the_output_collapsed(run):
    info = run.records[f"{PARTIAL}::parity[CPU-high]"]["artifacts"]["outputs"]["out"]
    layout = image_layout((1, 8, 8, 8))
    target, reference = Image.open(run.art / info["target"]), Image.open(run.art / info["reference"])
    for channel in range(4, 8):
        assert len(_colours(_tile(target, layout, channel))) == 1
        assert len(_colours(_tile(reference, layout, channel))) > 10
    for channel in range(4):
        assert len(_colours(_tile(target, layout, channel))) > 10


def test_error_heatmap_is_brightest_in_the_collapsed_channels_and_has_a_colour_scale(run):
    info = run.records[f"{PARTIAL}::parity[CPU-high]"]["artifacts"]["outputs"]["out"]
    layout = image_layout((1, 8, 8, 8))
    heat = Image.open(run.art / info["error"]).convert("RGB")
    brightness = [np.asarray(heat.crop(layout.tile_box(c)), dtype=float).sum(axis=2).mean() for c in range(8)]
    assert min(brightness[4:]) > 5 * max(brightness[:4])
    _, grid_h = layout.tile_box(0)[2:]
    bar = np.asarray(heat)[grid_h + 8]
    assert tuple(bar[0]) == tuple(_LUT[0]) and tuple(bar[-1]) == tuple(_LUT[255])
    assert info["error_max"] == pytest.approx(run.records[f"{PARTIAL}::parity[CPU-high]"]["outputs"]["out"]["max_abs"])


def test_histogram_has_errors_on_both_sides_of_the_tolerance_line(run):
    info = run.records[f"{PARTIAL}::parity[CPU-high]"]["artifacts"]["outputs"]["out"]
    hist = np.asarray(Image.open(run.art / info["histogram"]).convert("RGB"))
    red_columns = np.flatnonzero((hist == (220, 0, 0)).all(axis=2).any(axis=0))
    bar_columns = np.flatnonzero((hist == (70, 110, 170)).all(axis=2).any(axis=0))
    assert red_columns.size and bar_columns.size
    line = int(np.median(red_columns))
    # channels 0-3 differ by fp16 rounding (below atol), channels 4-7 by their whole value (above)
    assert (bar_columns < line).any() and (bar_columns > line).any()


def test_first_divergent_layer_is_drawn_too(run):
    artifacts = run.records[f"{PARTIAL}::parity[CPU-high]"]["artifacts"]
    layers = list(artifacts["layers"].values())
    assert [layer["layer"] for layer in layers] == ["tiny_conv"]
    assert layers[0]["role"] == "first divergent"
    mask = Image.open(run.art / layers[0]["mask"])
    layout = image_layout(layers[0]["shape"])
    for channel in range(layout.tiles):
        assert _colours(_tile(mask, layout, channel)) == {NEW_ZERO}


def test_every_output_gets_a_histogram_and_only_image_like_ones_get_pictures(run):
    outputs = run.records["multi_io.mnn::parity[CPU-low]"]["artifacts"]["outputs"]
    assert set(outputs) == {"scores", "ids_out"}
    for info in outputs.values():
        assert not info["image_like"] and "mask" not in info
        assert (run.art / info["histogram"]).is_file()
    demo = run.records["lama_like.mnn::parity[CPU-low]"]["artifacts"]["outputs"]["inpainted"]
    assert demo["layout"] == "1x3x32x32 read as NCHW, RGB"
    for kind in ("reference", "target", "error", "mask", "histogram"):
        assert (run.art / demo[kind]).is_file()
    # a passing RGB output: target looks like the reference, mask has no marks
    assert Image.open(run.art / demo["reference"]).size == Image.open(run.art / demo["target"]).size
    assert not {NEW_ZERO, NON_FINITE} & _colours(np.asarray(Image.open(run.art / demo["mask"]).convert("RGB")))


def test_on_failure_writes_nothing_for_passing_configurations(tmp_path):
    writer = ArtifactWriter(tmp_path)
    result = ParityEngine(ParitySettings(output_sink=writer)).check(DEMO, RunConfig("CPU", "high"))
    assert result.passed and result.artifacts is None and not any(tmp_path.iterdir())


def test_pictures_that_cannot_be_written_cost_the_pictures_not_the_verdict(tmp_path):
    (tmp_path / "partial_zero.fp16.mnn").write_text("a file where the item's folder should go")
    writer = ArtifactWriter(tmp_path)
    writer.label = f"{PARTIAL}::parity[CPU-high]"
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "partial_zero.mnn"), output_sink=writer))
    result = engine.check(COLLAPSE / PARTIAL, RunConfig("CPU", "high"))
    assert result.category.value == "partial_zero"
    assert result.artifacts["error"].startswith("pictures not written: ")
    assert "pictures:  pictures not written: " in result.message


def test_non_finite_output_is_magenta_in_mask_and_heatmap(tmp_path):
    writer = ArtifactWriter(tmp_path)
    engine = ParityEngine(ParitySettings(reference=str(COLLAPSE / "non_finite.mnn"), output_sink=writer, layers="off"))
    result = engine.check(COLLAPSE / "non_finite.fp16.mnn", RunConfig("CPU", "high"))
    assert result.category.value == "non_finite"
    info = result.artifacts["outputs"]["out"]
    layout = image_layout(info["shape"])
    for kind in ("mask", "error", "target"):
        image = Image.open(tmp_path / info[kind])
        assert all(_colours(_tile(image, layout, i)) == {NON_FINITE} for i in range(layout.tiles)), kind
    assert result.artifacts["layers"] == {}  # --mnn-layers off: nothing traced, no layer pictures


# -- the image-like rule and the picture geometry ------------------------------------------------------

@pytest.mark.parametrize(("shape", "expected"), [
    ((1, 3, 32, 32), "1x3x32x32 read as NCHW, RGB"),
    ((1, 1, 16, 10), "1x1x16x10 read as NCHW, grey"),
    ((1, 4, 8, 8), "1x4x8x8 read as NCHW, 4 channel tiles"),
    ((2, 8, 4, 4), "2x8x4x4 read as NCHW, 8 channel tiles"),
    ((1, 64, 64, 3), "1x64x64x3 read as NHWC, RGB"),
    ((1, 100, 4, 4), "1x100x4x4 read as NCHW, 100 channel tiles, first 64 channels shown"),
    ((10, 3, 8, 8), "10x3x8x8 read as NCHW, RGB, first 8 batch items shown"),
    ((1, 16, 10), "1x16x10 read as NCHW, grey"),
    ((3, 8, 8), "3x8x8 read as NCHW, RGB"),
    ((8, 8), "8x8 read as NCHW, grey"),
    ((1, 1000, 1, 1), None), ((1, 8), None), ((4, 7), None), ((2, 4, 16), None), ((1, 2, 3, 4, 5), None), ((16,), None),
])
def test_image_like_rule(shape, expected):
    layout = image_layout(shape)
    assert (layout.describe() if layout else None) == expected


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(1, 10), st.integers(1, 70), st.integers(2, 12), st.integers(2, 12)))
def test_tiles_fit_the_picture_and_never_overlap(shape):
    layout = image_layout(shape)
    target = np.zeros(shape, dtype=np.float32)
    picture = zero_nan_mask(target, target, layout)
    boxes = [layout.tile_box(i) for i in range(layout.tiles)]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= picture.width and 0 <= top < bottom <= picture.height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (1, 1, 8, 8), elements=st.floats(-4, 4, width=32)),
       hnp.arrays(np.bool_, (1, 1, 8, 8)), hnp.arrays(np.bool_, (1, 1, 8, 8)))
def test_mask_marks_exactly_the_new_zeros_and_non_finite_pixels(reference, zeroed, broken):
    target = np.where(zeroed, 0.0, reference + 1).astype(np.float32)
    target[broken] = np.nan
    layout = image_layout(reference.shape)
    pixels = np.asarray(zero_nan_mask(target, reference, layout))[::layout.scale, ::layout.scale]
    zero = (target == 0)[0, 0]
    assert ((pixels == NEW_ZERO).all(axis=2) == (zero & (reference[0, 0] != 0))).all()
    assert ((pixels == NON_FINITE).all(axis=2) == broken[0, 0]).all()
    assert ((pixels == BOTH_ZERO).all(axis=2) == (zero & (reference[0, 0] == 0))).all()


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (1, 3, 8, 8), elements=st.floats(-100, 100, width=32)),
       hnp.arrays(np.float32, (1, 3, 8, 8), elements=st.floats(-100, 100, width=32)))
def test_heatmap_maps_the_largest_error_to_the_brightest_colour(target, reference):
    layout = image_layout(target.shape)
    heat, top = error_heatmap(target, reference, layout)
    err = np.abs(target.astype(np.float64) - reference).max(axis=1)[0]
    assert top == pytest.approx(float(err.max()))
    grid = np.asarray(heat)[:layout.height * layout.scale:layout.scale, :layout.width * layout.scale:layout.scale]
    if top > 0:
        y, x = np.unravel_index(int(err.argmax()), err.shape)
        assert tuple(grid[y, x]) == tuple(_LUT[255])
    assert {tuple(p) for p in grid.reshape(-1, 3)} <= {tuple(c) for c in _LUT}


@given(st.text(min_size=1, max_size=40))
def test_item_folders_stay_inside_the_artifacts_directory(name):
    folder = item_folder(f"../{name}/m.mnn::parity[{name}]")
    assert folder.parts and ".." not in folder.parts and not folder.is_absolute()
    assert all("/" not in safe_name(part) for part in folder.parts)


# -- the HTML report ------------------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[str] = []
        self.cells: dict[str, dict[str, str]] = {}
        self.details: dict[str, str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.circles: list[dict[str, str]] = []
        self.scripts_with_src = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-model" in a:
            self.rows.append(a["data-model"])
        if tag == "td" and "data-nodeid" in a:
            self.cells[a["data-nodeid"]] = a
        if tag == "details":
            self.details[a["data-nodeid"]] = a["id"]
        if tag == "img":
            self.images.append(a["src"])
        if tag in ("a", "link") and "href" in a:
            self.links.append(a["href"])
        if tag == "circle":
            self.circles.append(a)
        if tag == "script" and "src" in a:
            self.scripts_with_src += 1


def parse_html(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_html_has_a_row_per_model_and_a_cell_and_result_per_item(run):
    page = parse_html(run.html.read_text())
    assert page.rows == sorted({r["model"] for r in run.records.values()})
    assert set(page.cells) == set(run.records) == set(page.details)
    for nodeid, rec in run.records.items():
        cell = page.cells[nodeid]
        assert cell["data-category"] == rec["category"] and cell["data-outcome"] == rec["outcome"]
        assert cell["class"] == ("g-ok" if rec["category"] == "ok" else "g-broken")
        assert page.details[nodeid] == result_id(nodeid) and f"#{result_id(nodeid)}" in page.links


def test_html_is_self_contained_and_embeds_every_picture(run):
    text = run.html.read_text()
    page = parse_html(text)
    assert page.scripts_with_src == 0 and "<link" not in text
    assert not [h for h in page.links if not h.startswith("#")]
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    written = sum(1 for rec in run.records.values() for group in ("outputs", "layers")
                  for info in rec["artifacts"][group].values()
                  for kind in ("reference", "target", "error", "mask", "histogram") if kind in info)
    assert len(page.images) == written


def test_layer_curve_has_a_point_per_layer_and_marks_the_first_divergent(run):
    rec = run.records[f"{PARTIAL}::parity[CPU-high]"]
    text = run.html.read_text()
    section = text.split(f'id="{result_id(rec["nodeid"])}"', 1)[1].split("</details>", 1)[0]
    circles = parse_html(section).circles
    assert len(circles) == len(rec["layers"])
    first = [c for c in circles if c["class"] == "first"]
    assert len(first) == 1 and first[0]["fill"] == "#d32f2f"
    assert "tiny_conv (first divergent)" in section


def test_missing_pictures_are_named_not_hidden(run):
    text = render(run.data, run.root / "nowhere")
    assert "picture not found: partial_zero.fp16.mnn/parity[CPU-high]/out.mask.png" in text
    assert "No pictures" in render(run.data, None)


def test_saved_json_renders_the_same_page_from_the_command_line(run, tmp_path):
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps(run.data))
    out = tmp_path / "again.html"
    proc = subprocess.run([sys.executable, "-m", "pytest_mnn_parity.report.html", str(saved), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == run.html.read_text()


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def test_html_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the screenshot test needs it")
    shot = tmp_path / "shot.png"
    # #all opens every result, so the matrix and the first result's pictures are both on screen.
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,2600",
                           f"--screenshot={shot}", run.html.as_uri() + "#all"],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    def count(colour):
        return int((np.abs(pixels.astype(int) - colour).max(axis=2) <= 2).sum())
    assert count((239, 154, 154)) > 2000  # the failing cells (and badges) in the matrix
    assert count((200, 230, 201)) > 500  # the passing ones
    assert count(NEW_ZERO) > 64 * 64 * 4  # the mask's four collapsed channels, drawn
