"""The preview PNG (issue 18): wide enough to read, three planes, a legend in the label table's colours,
names in the built-in bitmap font, and a window chosen by modality."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pictures import decode_png
from tsrt.outputs.font import ADVANCE, FONT, GLYPH_HEIGHT, GLYPH_WIDTH, render_text
from tsrt.outputs.preview import (
    MIN_WIDTH, SWATCH, WINDOWS, body_percentile_window, legend_entries, looks_like_ct, preview_window,
    render_legend, render_preview, write_preview,
)
from tsrt.pipeline.label_table import label_colour, read_label_table

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT, CT_SEG = DATA / "example_ct_sm.nii.gz", DATA / "example_seg_fast.nii.gz"
MR = DATA / "example_mr_sm.nii.gz"


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def ct_preview(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    if not CT.exists() or not CT_SEG.exists():
        pytest.skip(f"needs {CT.name} and {CT_SEG.name} in {DATA}")
    image, affine = _load(CT)
    labels = np.asanyarray(nib.load(CT_SEG).dataobj)
    names = read_label_table(nib.load(CT_SEG))
    path = write_preview(tmp_path_factory.mktemp("preview") / "preview.png", image, labels, affine, names)
    return decode_png(path.read_bytes()), labels, names


def test_the_example_ct_preview_is_wide_enough_to_read(ct_preview):
    rgb, _, _ = ct_preview
    assert rgb.shape[1] >= MIN_WIDTH >= 1200
    # The three panels are enlarged: the 122-voxel-wide axial slice takes about a third of the width.
    panel_rows = rgb[: rgb.shape[0] // 2]
    grey = (panel_rows[..., 0] == panel_rows[..., 1]) & (panel_rows[..., 1] == panel_rows[..., 2]) & (panel_rows[..., 0] > 40)
    assert grey[:, : MIN_WIDTH // 3].sum() > 20_000 and grey[:, MIN_WIDTH // 3 :].sum() > 20_000


def test_the_legend_shows_each_present_structure_in_its_palette_colour_and_name(ct_preview):
    rgb, labels, names = ct_preview
    present = sorted(int(label) for label in np.unique(labels) if label > 0)
    entries = legend_entries(present, names, rgb.shape[1])
    assert [entry.label for entry in entries] == present, "present structures only, sorted by label"
    assert len({entry.left for entry in entries}) > 1, "wrapped into columns"
    legend = render_legend(entries, rgb.shape[1])
    top = rgb.shape[0] - legend.shape[0]
    np.testing.assert_array_equal(rgb[top:], legend)  # the legend is the strip below the panels
    for entry in entries:
        swatch = rgb[top + entry.top : top + entry.top + SWATCH, entry.left : entry.left + SWATCH]
        assert (swatch == label_colour(entry.label)).all(), entry
        assert entry.name == names[entry.label]
        text = render_text(entry.name)
        drawn = rgb[top + entry.top : top + entry.top + text.shape[0], entry.text_left : entry.text_left + text.shape[1]]
        np.testing.assert_array_equal(drawn.min(axis=2) == 255, text, err_msg=entry.name)


def test_a_known_word_is_drawn_with_the_font_bitmap():
    mask = render_text("Liver_3", scale=2)
    assert mask.shape == (GLYPH_HEIGHT * 2, (7 * ADVANCE - 1) * 2)
    for position, char in enumerate("Liver_3"):
        cell = mask[::2, position * ADVANCE * 2 : position * ADVANCE * 2 + GLYPH_WIDTH * 2 : 2]
        np.testing.assert_array_equal(cell, FONT[char], err_msg=char)
        assert not mask[:, (position * ADVANCE + GLYPH_WIDTH) * 2 : (position + 1) * ADVANCE * 2].any(), "a gap"
    assert FONT["L"][:, 0].sum() == 7 and FONT["L"][6].all(), "L: a stem and a foot"
    np.testing.assert_array_equal(render_text("~"), render_text("?"), "characters without a glyph show as ?")
    assert {*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.() "} <= set(FONT)


def test_the_window_follows_the_modality():
    rng = np.random.default_rng(0)
    mr = np.zeros((40, 40, 20), dtype=np.float32)
    mr[5:35, 5:35] = rng.uniform(200, 1200, size=(30, 30, 20))
    mr[20, 20, 10] = 50_000  # one hot voxel must not stretch the window
    assert not looks_like_ct(mr)
    level, width = preview_window(mr)
    assert 150 < level - width / 2 < 260 and 1140 < level + width / 2 < 1250, "the body's 1st..99th percentile"
    assert preview_window(mr, "MR") == (level, width) == body_percentile_window(mr)
    ct = np.full((40, 40, 20), -1000.0, dtype=np.float32)
    ct[5:35, 5:35] = 40
    assert looks_like_ct(ct) and preview_window(ct) == WINDOWS["soft_tissue"]
    assert preview_window(mr, "CT") == WINDOWS["soft_tissue"], "the DICOM modality wins over the values"
    assert preview_window(ct, "MR") != WINDOWS["soft_tissue"]


def test_the_example_mr_gets_a_percentile_window(tmp_path: Path):
    if not MR.exists():
        pytest.skip(f"needs {MR.name} in {DATA}")
    image, affine = _load(MR)
    assert not looks_like_ct(image)
    labels = np.zeros(image.shape, dtype=np.uint8)
    rgb = decode_png(write_preview(tmp_path / "mr.png", image, labels, affine, {}).read_bytes())
    assert rgb.shape[1] >= MIN_WIDTH
    panels = rgb[60:, :, 0]  # below the panel titles; no labels, so grey
    body = panels[panels > 0]
    assert (body == 255).mean() < 0.05 and np.percentile(body, 95) > 150, "the body spans the grey range"
    as_ct = render_preview(image, labels, affine, {}, modality="CT")[60:, :, 0]
    assert (as_ct[as_ct > 0] == 255).mean() > 0.2, "a soft-tissue window would burn out an MR"
