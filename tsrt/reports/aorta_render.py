"""The aorta report's page, drawn with numpy and tsrt's bitmap font (no browser, VTK or imaging library).

Upstream renders an HTML page (wkhtmltoimage under Xvfb) around 3D views rendered with fury/VTK and
stores 48 frames of it as an RGB NIfTI. tsrt draws the same content itself: title, version, date;
the overview (the aorta in grey, branch vessels darker, the centerline red, each landmark's cut in
upstream's landmark colour with its number, seen from the front and from the left); the section table
(length, widest diameter, volume, false lumen volume); per landmark the turned CT slice with the
cut's outline (false lumen red) and both diameters, with area and diameters or "not in image"; the
disclaimer. The page is written as PNG, as a one-page PDF, or as a one-frame RGB NIfTI laid out like
upstream's. Plane pictures and the NIfTI layout are the pulmonary report's (tsrt.reports.pulmonary_render).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from tsrt.outputs.font import GLYPH_HEIGHT, draw_text
from tsrt.outputs.preview import encode_png
from tsrt.pipeline.write import atomic_output
from tsrt.reports.pulmonary_geometry import boundary, find_center
from tsrt.reports.common import centred_text, draw_footer, paste, wrap_text
from tsrt.reports.pulmonary_render import DISCLAIMER, plane_picture, rgb_frames_nifti

if TYPE_CHECKING:
    from tsrt.reports.aorta_cpr import Straightened
    from tsrt.reports.aorta_measure import AortaReport

#: Upstream's plotting colours in order: landmark N is drawn in the N-th.
LANDMARK_COLOURS = (
    (0, 1, 0), (1, 0.27, 0.18), (0, 0, 1), (0.27, 1, 0.18), (0.6, 0, 0), (0, 0.6, 0), (0.27, 0.18, 1),
    (0.8, 0.5, 0), (0.3, 0, 0), (0.5, 0.5, 0.5), (0.4, 0, 0.7),
)
WHITE, GREY, GREEN, RED = (255, 255, 255), (170, 170, 170), (0, 200, 0), (255, 60, 60)
PAGE_WIDTH, OVERVIEW_HEIGHT, PICTURE, ROW = 1200, 640, 110, 118
#: Rows above the content: title, version, date (draw_header).
HEADER_HEIGHT = 84
SCALE = 2
LINE = GLYPH_HEIGHT * SCALE + 6


def resize_nearest(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize to `height` x `width` pixels (aspect ratio not kept)."""
    rows = np.minimum((np.arange(height) * picture.shape[0] / height).astype(int), picture.shape[0] - 1)
    cols = np.minimum((np.arange(width) * picture.shape[1] / width).astype(int), picture.shape[1] - 1)
    return picture[rows][:, cols]


def _resize(picture: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize to `height` rows, keeping the aspect ratio."""
    return resize_nearest(picture, height, max(1, int(round(picture.shape[1] * height / picture.shape[0]))))


# --------------------------------------------------------------------------------------------- overview


def projection(report: AortaReport, axis: int) -> np.ndarray:
    """A shaded view of the aorta along a grid axis (1: from the front, 0: from the patient's left), RGB.

    The report grid is RAS: the front view shows the patient's right on the left, superior at the top.
    Depth shading: nearer surface is brighter. Vessels, centerline and cuts are drawn over the aorta.
    """
    grid = report.grid
    spacing = np.asarray(grid.spacing, dtype=float)

    def depth_map(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel whether the mask is hit and how near (0..1) its first voxel is, viewed from + `axis`."""
        hit = mask.any(axis=axis)
        first = mask.shape[axis] - 1 - np.argmax(np.flip(mask, axis=axis), axis=axis)
        return hit, first / max(mask.shape[axis] - 1, 1)

    aorta_hit, aorta_near = depth_map(grid.aorta > 0)
    vessel_hit, _ = depth_map(grid.vessels > 0)
    image = np.zeros(aorta_hit.shape + (3,), dtype=np.float64)
    image[vessel_hit] = 0.3
    shade = 0.35 + 0.6 * (aorta_near - aorta_near[aorta_hit].min()) / max(np.ptp(aorta_near[aorta_hit]), 1e-6) \
        if aorta_hit.any() else aorta_near
    image[aorta_hit] = 0.7 * shade[aorta_hit, None]
    image[report.centerline.image.any(axis=axis)] = (1, 0, 0)
    labels = []
    for number, landmark in report.landmarks.items():
        if landmark.empty or landmark.roi is None:
            continue
        cut = landmark.roi.any(axis=axis)
        image[cut] = LANDMARK_COLOURS[number - 1]
        centre = find_center(cut)
        if centre is not None:
            labels.append((number, centre))
    # rows: superior at the top; columns: the remaining grid axis (x: right->left shown left->right for axis 1)
    in_plane = [a for a in range(3) if a != axis]
    picture = (np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 0, 2)[::-1]  # (z, other)
    if axis == 0:
        picture = picture[:, ::-1]  # from the left: anterior on the left
    pixel_mm = spacing[in_plane[1]] / spacing[in_plane[0]]
    width = max(1, int(round(picture.shape[1] / pixel_mm)))
    cols = np.minimum((np.arange(width) * pixel_mm).astype(int), picture.shape[1] - 1)
    picture = np.ascontiguousarray(picture[:, cols])
    height = picture.shape[0]
    for number, (first, second) in labels:
        row = height - 1 - int(second)
        col = int(first / pixel_mm) if axis == 1 else picture.shape[1] - 1 - int(first / pixel_mm)
        draw_text(picture, str(number), max(0, row - GLYPH_HEIGHT), min(max(0, col + 12), picture.shape[1] - 1),
                  WHITE, 1)
    return picture


def overview(report: AortaReport, height: int = OVERVIEW_HEIGHT) -> np.ndarray:
    """Front and left views side by side, `height` pixels tall."""
    views = [_resize(projection(report, axis), height) for axis in (1, 0)]
    gap = np.zeros((height, 12, 3), dtype=np.uint8)
    return np.concatenate([views[0], gap, views[1]], axis=1)


def landmark_picture(landmark, size: int = PICTURE) -> np.ndarray:
    """The turned CT slice (or the cut alone) with the outline, false lumen in red and both diameters."""
    picture = landmark.picture
    mask = picture["mask"]
    ct = picture["ct"] if picture["ct"] is not None else np.where(mask > 0, 300.0, -700.0)
    drawn = plane_picture(SimpleNamespace(slice_ct=ct, slice_mask=mask, ends_voxel=picture["ends"]), size)
    if picture["false_lumen"].any():
        scale = max(1, size // max(ct.shape))
        false = np.repeat(np.repeat(picture["false_lumen"] > 0, scale, axis=0), scale, axis=1)
        drawn[boundary(false)[::-1]] = RED
    return _resize(drawn, size) if drawn.shape[0] != size else drawn


# --------------------------------------------------------------------------------------------- page


def _value(value, unit: str) -> str:
    return "-" if value is None else f"{value} {unit}"


def draw_header(page: np.ndarray, metadata: dict) -> None:
    """The page's first HEADER_HEIGHT rows: title, upstream's report version and when the page was drawn."""
    width = page.shape[1]
    centred_text(page, "Aorta Report", 12, 0, width, WHITE, 3)
    centred_text(page, f"version {metadata.get('version', '')}", 42, 0, width, GREY, 1)
    centred_text(page, f"Generated on: {time.strftime('%d.%m.%Y %H:%M:%S')}", 58, 0, width, WHITE, SCALE)


def footer_lines(width: int) -> list[str]:
    """The disclaimer wrapped to a page `width` pixels wide (drawn with common.draw_footer)."""
    return [line for paragraph in DISCLAIMER for line in wrap_text(paragraph, width - 20, 1)]


def render_page(report: AortaReport) -> np.ndarray:
    """The report page (RGB uint8): header, overview and section table, landmarks, disclaimer."""
    footer = footer_lines(PAGE_WIDTH)
    picture = overview(report)
    left_width = max(picture.shape[1] + 20, 690)
    header, title_row = HEADER_HEIGHT, 34
    table_top = title_row + picture.shape[0] + 16
    table_height = LINE * (1 + len(report.sections)) + 10
    main_height = max(table_top + table_height, title_row + ROW * len(report.landmarks))
    main_top = header + 10
    height = main_top + main_height + 24 + len(footer) * (GLYPH_HEIGHT + 4) + 10
    page = np.zeros((height, PAGE_WIDTH, 3), dtype=np.uint8)
    draw_header(page, report.json["metadata"])
    centred_text(page, "Overview (front, left)", main_top, 0, left_width, WHITE, SCALE)
    paste(page, picture, main_top + title_row, 10)
    top = main_top + table_top
    columns = (("Section", 10), ("Length", 230), ("Max. Dia.", 340), ("Volume", 460), ("Volume FL", 570))
    for name, left in columns:
        draw_text(page, name, top, left, WHITE, SCALE)
    for row, (name, stats) in enumerate(report.sections.items(), start=1):
        y = top + row * LINE
        draw_text(page, name.replace("_", " "), y, 10, GREY, SCALE)
        for (key, unit), (_, left) in zip((("length", "cm"), ("max_diameter", "cm"), ("volume", "ml"),
                                           ("volume_false_lumen", "ml")), columns[1:]):
            value = stats[key]
            draw_text(page, _value(None if value is None else round(float(value), 1), unit), y, left, GREY, SCALE)
    centred_text(page, "Landmarks", main_top, left_width, PAGE_WIDTH - left_width, WHITE, SCALE)
    for row, (number, landmark) in enumerate(sorted(report.landmarks.items())):
        y = main_top + title_row + row * ROW
        left = left_width + 10
        if landmark.empty or landmark.picture is None:
            page[y : y + PICTURE, left : left + PICTURE] = 40
        else:
            paste(page, landmark_picture(landmark), y, left)
        text_left = left + PICTURE + 10
        draw_text(page, f"{number} - {landmark.name}", y + 4, text_left, WHITE, SCALE)
        values = landmark.values
        if landmark.empty:
            draw_text(page, "not in image", y + 4 + LINE, text_left, GREY, SCALE)
            continue
        draw_text(page, f"area: {values['area']} cm2", y + 4 + LINE, text_left, GREEN, SCALE)
        draw_text(page, f"diam: {values['diameter']} x {values['diameter_pd']} cm", y + 4 + 2 * LINE, text_left,
                  GREEN, SCALE)
        if values.get("area_fl"):
            draw_text(page, f"FL: {values['area_fl']} cm2, {values['diameter_fl']} x {values['diameter_fl_pd']} cm",
                      y + 4 + 3 * LINE, text_left, RED, SCALE)
    footer_top = main_top + main_height + 24
    draw_footer(page, footer_top, footer, GREY)
    return page


def pdf_bytes(rgb: np.ndarray, dpi: float = 120.0) -> bytes:
    """A one-page PDF holding the picture (Flate-compressed RGB), no PDF library needed."""
    height, width, _ = rgb.shape
    points_w, points_h = width * 72.0 / dpi, height * 72.0 / dpi
    image = zlib.compress(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes(), 6)
    content = f"q {points_w:.2f} 0 0 {points_h:.2f} 0 0 cm /Im0 Do Q".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {points_w:.2f} {points_h:.2f}] "
        f"/Resources << /XObject << /Im0 4 0 R >> >> /Contents 5 0 R >>".encode(),
        f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace /DeviceRGB "
        f"/BitsPerComponent 8 /Filter /FlateDecode /Length {len(image)} >>\nstream\n".encode() + image
        + b"\nendstream",
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write_page(page: np.ndarray, path: Path) -> Path:
    """A rendered page as PNG, or as PDF when `path` ends in .pdf."""
    data = pdf_bytes(page) if Path(path).suffix.lower() == ".pdf" else encode_png(page)
    with atomic_output(Path(path)) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_page_nifti(page: np.ndarray, path: Path) -> Path:
    """A rendered page as an RGB NIfTI laid out like upstream's report image (one frame: tsrt's views do not turn)."""
    import nibabel as nib

    image = rgb_frames_nifti([page])
    with atomic_output(Path(path)) as temp:
        nib.save(image, temp)
    return Path(path)


def write_cpr_overview(report: AortaReport, path: Path, straight: Straightened | None = None) -> Path:
    """The curved planar reformation overview (upstream's -c): sagittal and coronal CPR and the diameter profile.

    `straight`: the CPR stack when the caller has it already (the animation draws from the same one).
    """
    from tsrt.reports.aorta_cpr import render_cpr_overview

    with atomic_output(Path(path)) as temp:
        temp.write_bytes(encode_png(render_cpr_overview(report, straight=straight)))
    return Path(path)


__all__ = [
    "draw_header", "footer_lines", "pdf_bytes", "render_page", "resize_nearest", "write_cpr_overview", "write_page",
    "write_page_nifti",
]
