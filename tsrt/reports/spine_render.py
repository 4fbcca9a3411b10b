"""The spine report's pictures and page: tsrt's own drawings of what TotalSegmentator's report shows.

Upstream draws the sagittal overview with matplotlib and renders its HTML page to PNG with
wkhtmltoimage (imgkit), a browser engine outside PyPI. tsrt draws both with numpy and its bitmap
font (tsrt.outputs.font), so the runtime install needs no imaging library, and writes the page as
self-contained HTML (the overview embedded). The content is upstream's: every measured vertebra on
its own sagittal slice with its outline (green) and three height lines (red), a label
"L1: anterior - middle - posterior (-difference %) (x: slice, HU: median)" in yellow when the
heights differ by 20 % or more or the body is under 2 ml; the page: patient details, the verdict
on the lumbar spine, the overview.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tsrt.outputs.font import GLYPH_HEIGHT, draw_text, text_width
from tsrt.outputs.preview import orthogonal_slice, window
from tsrt.reports.spine_heights import SpineHeights, Vertebra

HU_WINDOW = (-500.0, 1500.0)
PADDING_MM = 40.0
TEXT_OFFSET_MM = 20.0  # labels start this far behind the centroid
SMALL_BODY_ML = 2.0
OVERVIEW_HEIGHT = 900  # px of the overview's image part
TEXT_SCALE = 2
LINE = GLYPH_HEIGHT * TEXT_SCALE + 4
GREEN, RED, YELLOW, WHITE, GREY = (0, 200, 0), (230, 30, 30), (255, 220, 0), (255, 255, 255), (170, 170, 170)
PAGE_WIDTH = 1200
CITATION = "https://pubs.rsna.org/doi/10.1148/ryai.230024"
DISCLAIMER = "For informational purposes only. Not a medical device."
CREDIT = "Measured as TotalSegmentator 2.18 (totalseg_spine_report) measures, by tsrt."


@dataclass(frozen=True)
class Verdict:
    """What the page says about the lumbar spine (upstream's template variables)."""

    has_measurements: bool
    high_height_difference: tuple[str, ...]  # e.g. ("L1",): height difference above 20 %
    low_intensity: tuple[str, ...]  # median HU below the phase's threshold
    contrast_phase: str

    @property
    def found_fracture(self) -> bool:
        return bool(self.high_height_difference or self.low_intensity)

    def lines(self) -> list[str]:
        if not self.has_measurements:
            return ["No vertebrae measurements available.", "Please check the segmentation output."]
        if not self.found_fracture:
            return ["Lumbar spine contains no fracture."]
        lines = []
        if self.high_height_difference:
            lines += ["Lumbar spine compression fracture in:", ", ".join(self.high_height_difference)]
        if self.low_intensity:
            lines += ([""] if lines else []) + ["Lumbar spine low attenuation in:", ", ".join(self.low_intensity)]
        return lines


# --------------------------------------------------------------------------------------------- overview


def vertebra_label(vertebra: Vertebra, slices: int, lumbar_view: bool) -> tuple[list[str], bool]:
    """The label's lines and whether it is highlighted (upstream's yellow)."""
    heights = " - ".join(f"{h.mm:.1f}" if h.found else "0.0" for h in reversed(list(vertebra.heights.values())))
    highlighted = vertebra.looks_fractured() or vertebra.volume_mm3 / 1000.0 < SMALL_BODY_ML
    first = f"{vertebra.short_name}: {heights}"
    if highlighted:
        first += f" (-{vertebra.difference_percent()}%)"
    where = f"(x: {slices - 1 - vertebra.x_slice}, HU: {int(round(vertebra.median_hu))})"
    return ([first, where] if lumbar_view else [f"{first} {where}"]), highlighted


def _draw_line(
    canvas: np.ndarray, start: tuple[float, float], end: tuple[float, float], colour: tuple[int, int, int],
    width: int = 2,
) -> None:
    """A straight line between two (row, column) points, `width` pixels thick, clipped to the canvas."""
    count = int(max(abs(end[0] - start[0]), abs(end[1] - start[1]))) * 2 + 2
    rows = np.rint(np.linspace(start[0], end[0], count)).astype(int)
    cols = np.rint(np.linspace(start[1], end[1], count)).astype(int)
    for dr in range(-(width // 2), width - width // 2):
        for dc in range(-(width // 2), width - width // 2):
            r, c = rows + dr, cols + dc
            keep = (r >= 0) & (r < canvas.shape[0]) & (c >= 0) & (c < canvas.shape[1])
            canvas[r[keep], c[keep]] = colour


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a background 4-neighbour (the contour upstream draws)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_overview(heights: SpineHeights, lumbar_view: bool = False) -> np.ndarray:
    """All measured vertebrae in one sagittal view, each from its own slice (upstream's combined preview).

    Anterior on the left, superior up, true proportions; labels in a column on the right.
    Returns an (H, W, 3) uint8 picture.
    """
    if not heights.vertebrae:
        canvas = np.zeros((200, 600, 3), dtype=np.uint8)
        draw_text(canvas, "No vertebrae measurements available", 90, 90, WHITE)
        return canvas
    sy, sz = heights.spacing[1], heights.spacing[2]
    ys, zs = [], []
    for v in heights.vertebrae:
        yy, zz = np.nonzero(v.slice_mask)
        ys += [yy.min() + v.slice_box[0].start, yy.max() + v.slice_box[0].start]
        zs += [zz.min() + v.slice_box[1].start, zz.max() + v.slice_box[1].start]
    y0 = max(0, min(ys) - int(round(PADDING_MM / sy)))
    y1 = min(heights.shape[1], max(ys) + int(round(PADDING_MM / sy)))
    z0 = max(0, min(zs) - int(round(PADDING_MM / sz)))
    z1 = min(heights.shape[2], max(zs) + int(round(PADDING_MM / sz)))
    ct = np.full((y1 - y0, z1 - z0), -1000.0, dtype=np.float32)
    labels = np.zeros(ct.shape, dtype=np.int32)
    for number, v in enumerate(heights.vertebrae, start=1):  # upstream: first come, first drawn
        box = (slice(v.slice_box[0].start - y0, v.slice_box[0].stop - y0),
               slice(v.slice_box[1].start - z0, v.slice_box[1].stop - z0))
        free = v.slice_mask & (labels[box] == 0)
        ct[box][free] = v.slice_ct[free]
        labels[box][free] = number

    pixel_mm = (z1 - z0) * sz / OVERVIEW_HEIGHT
    level, width = (HU_WINDOW[0] + HU_WINDOW[1]) / 2, HU_WINDOW[1] - HU_WINDOW[0]
    spacing = (1.0, sy, sz)
    grey = orthogonal_slice(window(ct, level, width)[None], spacing, "sagittal", 0, pixel_mm)
    shown = orthogonal_slice(labels[None], spacing, "sagittal", 0, pixel_mm)
    image = np.repeat(grey[..., None], 3, axis=2)
    for number in range(1, len(heights.vertebrae) + 1):
        image[_outline(shown == number)] = GREEN

    def to_pixel(y: float, z: float) -> tuple[float, float]:  # voxel (y, z) -> (row, column) of the picture
        return ((z1 - 1 - z + 0.5) * sz / pixel_mm - 0.5, (y1 - 1 - y + 0.5) * sy / pixel_mm - 0.5)

    texts = []
    for v in heights.vertebrae:
        for h in v.heights.values():
            if h.found:
                _draw_line(image, to_pixel(*h.start), to_pixel(*h.end), RED)
        lines, highlighted = vertebra_label(v, heights.shape[0], lumbar_view)
        texts.append((to_pixel(v.centroid[1] - TEXT_OFFSET_MM / sy, v.centroid[2])[0], lines, highlighted))

    column = max(text_width(line, TEXT_SCALE) for _, lines, _ in texts for line in lines) + 24
    canvas = np.zeros((image.shape[0], image.shape[1] + column, 3), dtype=np.uint8)
    canvas[:, : image.shape[1]] = image
    for row, lines, highlighted in texts:
        top = int(round(row)) - len(lines) * LINE // 2
        for i, line in enumerate(lines):
            draw_text(canvas, line, max(0, top + i * LINE), image.shape[1] + 12, YELLOW if highlighted else WHITE,
                      TEXT_SCALE)
    return canvas


# --------------------------------------------------------------------------------------------- page


def _to_date(value: object) -> str:
    """A DICOM date (YYYYMMDD) as dd.mm.YYYY, like upstream's template filter; anything else as given."""
    text = str(value or "")
    return f"{text[6:8]}.{text[4:6]}.{text[0:4]}" if len(text) == 8 and text.isdigit() else text


def patient_rows(metadata: Mapping[str, object], verdict: Verdict) -> list[tuple[str, str]]:
    return [
        ("Sex", str(metadata.get("PatientSex", ""))),
        ("Age", str(metadata.get("PatientAge", ""))),
        ("Study", str(metadata.get("StudyDescription", ""))),
        ("Study Date", _to_date(metadata.get("StudyDate"))),
        ("Contrast Phase", verdict.contrast_phase.replace("_", " ")),
    ]


def render_page(overview: np.ndarray, metadata: Mapping[str, object], verdict: Verdict, generated: str) -> np.ndarray:
    """The report's front page as a picture: title, patient details, verdict, overview, disclaimer."""
    scale = min(1.0, (PAGE_WIDTH - 40) / overview.shape[1])
    if scale < 1.0:  # nearest-neighbour shrink to the page width
        rows = np.minimum((np.arange(int(overview.shape[0] * scale)) / scale).astype(int), overview.shape[0] - 1)
        cols = np.minimum((np.arange(int(overview.shape[1] * scale)) / scale).astype(int), overview.shape[1] - 1)
        overview = overview[rows][:, cols]
    header, details, box = 90, 2 * LINE + 30, (len(verdict.lines()) + 1) * LINE + 30
    height = header + details + box + overview.shape[0] + 4 * LINE + 60
    page = np.zeros((height, PAGE_WIDTH, 3), dtype=np.uint8)
    title = f"Spine report {metadata.get('version', '')}".strip()
    draw_text(page, title, 20, (PAGE_WIDTH - text_width(title, 4)) // 2, WHITE, 4)
    stamp = f"Generated on: {generated}"
    draw_text(page, stamp, 62, (PAGE_WIDTH - text_width(stamp, 2)) // 2, GREY, 2)
    top, left = header, 20
    page[top : top + details - 10, 10 : PAGE_WIDTH - 10] = (37, 37, 37)
    draw_text(page, "PATIENT DETAILS", top + 8, left, WHITE, 2)
    for label, value in patient_rows(metadata, verdict):
        cell = max(text_width(label, 2), text_width(value, 2)) + 40
        draw_text(page, label, top + 8 + LINE, left, GREY, 2)
        draw_text(page, value, top + 8 + 2 * LINE, left, (187, 134, 252), 2)
        left += cell
    top += details
    colour = RED if verdict.found_fracture or not verdict.has_measurements else GREEN
    page[top : top + box - 10, 10 : PAGE_WIDTH - 10] = colour
    page[top + 4 : top + box - 14, 14 : PAGE_WIDTH - 14] = (37, 37, 37)
    for i, line in enumerate(verdict.lines()):
        draw_text(page, line, top + 18 + i * LINE, 30, WHITE, 2)
    symbol = "OK" if colour == GREEN else "X"
    draw_text(page, symbol, top + 14, PAGE_WIDTH - 40 - text_width(symbol, 5), colour, 5)
    top += box
    left = (PAGE_WIDTH - overview.shape[1]) // 2
    page[top : top + overview.shape[0], left : left + overview.shape[1]] = overview
    top += overview.shape[0] + 20
    for line in (DISCLAIMER, f"Please cite: {CITATION}", CREDIT):
        draw_text(page, line, top, 20, GREY, 2)
        top += LINE
    return page


def render_html(overview_png: bytes, metadata: Mapping[str, object], verdict: Verdict, generated: str) -> str:
    """The front page as one self-contained HTML file (the overview embedded as a PNG)."""
    e = html.escape
    details = "".join(
        f'<div class="cell"><div class="label">{e(label)}</div><div class="value">{e(value)}</div></div>'
        for label, value in patient_rows(metadata, verdict)
    )
    status = "warning" if verdict.found_fracture or not verdict.has_measurements else "success"
    verdict_html = "<br>".join(e(line) for line in verdict.lines())
    image = base64.b64encode(overview_png).decode("ascii")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Spine report</title>
<style>
body {{ margin: 0; font-family: Arial, sans-serif; background: #000; color: #fff; }}
header {{ text-align: center; padding: 16px; }}
h1 {{ font-size: 24px; margin: 0; }} h1 small {{ font-size: 13px; color: #aaa; font-weight: normal; }}
.stamp {{ font-size: 12px; }} .panel {{ background: rgb(37, 37, 37); margin: 8px; padding: 8px 16px; }}
.cell {{ display: inline-block; margin-right: 32px; }} .label {{ font-size: 14px; }}
.value {{ font-size: 20px; font-weight: bold; color: #bb86fc; }}
.status {{ border: 4px solid; padding: 16px; font-size: 18px; }}
.warning {{ border-color: #ff4136; }} .success {{ border-color: #19a974; }}
.overview {{ text-align: center; }} .overview img {{ max-width: 100%; }}
footer {{ color: #ccc; font-size: 12px; padding: 8px; border-top: 1px solid #ccc; }}
</style>
</head>
<body>
<header><h1>Spine report <small>{e(str(metadata.get("version", "")))}</small></h1>
<div class="stamp">Generated on: <b>{e(generated)}</b></div></header>
<div class="panel"><h3>Patient Details</h3>{details}</div>
<div class="panel status {status}">{verdict_html}</div>
<div class="overview"><img alt="vertebral heights" src="data:image/png;base64,{image}"></div>
<footer><p>{e(DISCLAIMER)}</p><p>Please cite the following article(s): {e(CITATION)}</p></footer>
</body>
</html>
"""
