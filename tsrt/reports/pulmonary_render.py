"""The pulmonary report's page, drawn with numpy and tsrt's bitmap font (no browser, VTK or imaging library).

Upstream renders an HTML page with wkhtmltoimage (imgkit, under Xvfb) around a rotating VTK/fury view
of the artery and its five cuts, 24 frames stored as one RGB NIfTI. tsrt draws the same page content
itself: title, version and date; the overview (the artery translucent grey, the cuts in upstream's
colours, numbered, turning 18 degrees per frame about the body's long axis, seen from the front); per
landmark the rotated CT slice with the cut's outline and both diameters and the numbers (area in cm2,
diameters in cm, or "not in image"); and the disclaimer. The frames go into the NIfTI exactly as
upstream lays them out (tsrt.reports.common.rgb_pages_nifti, last frame first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tsrt.outputs.font import GLYPH_HEIGHT, draw_text
from tsrt.outputs.preview import encode_png
from tsrt.reports import pulmonary_geometry as geometry
from tsrt.reports.common import centred_text, draw_footer, paste, rgb_pages_nifti, wrap_text

if TYPE_CHECKING:
    import nibabel as nib

    from tsrt.reports.pulmonary_measure import LandmarkMeasurement, PulmonaryMeasurement

FRAMES = 24
#: Upstream turns the view int(360 / 24 * 1.2) = 18 degrees per frame.
TURN_DEGREES = int(360 / FRAMES * 1.2)
#: Upstream's landmark colours (aorta_report.plotting.colors, in order) and the artery's grey.
CUT_COLOURS = ((0.0, 1.0, 0.0), (1.0, 0.27, 0.18), (0.0, 0.0, 1.0), (0.27, 1.0, 0.18), (0.6, 0.0, 0.0))
ARTERY_GREY, ARTERY_OPACITY = 0.7, 0.3
#: Upstream's window for the plane pictures (HU).
PLANE_VMIN, PLANE_VMAX = -700.0, 1000.0
GREEN, WHITE, GREY = (0, 200, 0), (255, 255, 255), (170, 170, 170)
PAGE_WIDTH, OVERVIEW, PICTURE, ROW = 1000, 600, 120, 128
DISCLAIMER = (
    "This software is a prototype version and is not designed or intended for use in the diagnosis or "
    "classification of any medical complaint or for any other medical use. This prototype is for medical "
    "research purposes only. This software is provided AS IS, without a warranty of any kind.",
    "If used for research purposes, cite: https://pubs.rsna.org/doi/10.1148/ryai.230024",
    "Report layout after TotalSegmentator (AI Lab, Department of Radiology, University Hospital Basel), drawn by tsrt.",
)


# --------------------------------------------------------------------------------------------- drawing


def draw_line(canvas: np.ndarray, start: Sequence[float], end: Sequence[float], colour: Sequence[int], width: int = 2) -> None:
    """A straight line between two (row, column) points, `width` pixels thick."""
    steps = int(max(abs(end[0] - start[0]), abs(end[1] - start[1]))) * 2 + 1
    rows = np.rint(np.linspace(start[0], end[0], steps)).astype(int)
    cols = np.rint(np.linspace(start[1], end[1], steps)).astype(int)
    for dr in range(width):
        for dc in range(width):
            r, c = rows + dr - width // 2, cols + dc - width // 2
            keep = (r >= 0) & (r < canvas.shape[0]) & (c >= 0) & (c < canvas.shape[1])
            canvas[r[keep], c[keep]] = colour


def plane_picture(landmark: LandmarkMeasurement, size: int = PICTURE) -> np.ndarray:
    """The rotated CT slice of a cut (upstream's window, origin at the bottom) with its outline and diameters."""
    ct, mask = landmark.slice_ct, landmark.slice_mask
    scale = max(1, size // max(ct.shape))
    grey = (np.clip((ct - PLANE_VMIN) / (PLANE_VMAX - PLANE_VMIN), 0, 1) * 255).astype(np.uint8)
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    picture = np.repeat(grey[:, :, None], 3, axis=2)
    outline = geometry.boundary(np.repeat(np.repeat(mask > 0, scale, axis=0), scale, axis=1))
    picture[outline] = (0, 255, 0)
    if landmark.ends_voxel is not None:
        start, end, start_pd, end_pd = ([p[0] * scale + scale / 2, p[1] * scale + scale / 2] for p in landmark.ends_voxel)
        draw_line(picture, start, end, (0, 255, 0))
        draw_line(picture, start_pd, end_pd, (0, 255, 0))
    return np.ascontiguousarray(picture[::-1])


def _smooth(volume: np.ndarray) -> np.ndarray:
    """3x3x3 box average (for surface normals)."""
    padded = np.pad(volume.astype(np.float32), 1)
    total = np.zeros(volume.shape, dtype=np.float32)
    n0, n1, n2 = volume.shape
    for a in range(3):
        for b in range(3):
            for c in range(3):
                total += padded[a : a + n0, b : b + n1, c : c + n2]
    return total / 27


class OverviewRenderer:
    """The artery (translucent grey surface) and its cuts (opaque, coloured, numbered), turning about the body axis.

    Points are splatted orthographically with a depth buffer and Lambert shading; the measuring grid is
    in RAS order, so the front view puts the patient's right on the left and superior at the top.
    """

    def __init__(self, measurement: PulmonaryMeasurement, size: int = OVERVIEW) -> None:
        spacing = np.asarray(measurement.spacing, dtype=np.float64)
        artery = measurement.artery > 0
        surface = np.argwhere(geometry.boundary(artery))
        gradient = np.stack(np.gradient(_smooth(artery)), axis=-1)[tuple(surface.T)]
        normals = -gradient / np.maximum(np.linalg.norm(gradient, axis=1, keepdims=True), 1e-6)
        self.artery_points = surface * spacing
        self.artery_normals = normals
        cuts, colours, cut_normals, labels = [], [], [], []
        for index, landmark in sorted(measurement.landmarks.items()):
            if not landmark.present or landmark.cut is None:
                continue
            voxels = np.argwhere(landmark.cut > 0)
            normal = geometry.mask_normal(landmark.cut)
            cuts.append(voxels * spacing)
            cut_normals.append(np.repeat(normal[None] / spacing / np.linalg.norm(normal / spacing), len(voxels), 0))
            colours.append(np.repeat(np.array([CUT_COLOURS[index - 1]]), len(voxels), axis=0))
            labels.append((index, np.asarray(landmark.centre, dtype=np.float64) * spacing))
        self.cut_points = np.concatenate(cuts) if cuts else np.zeros((0, 3))
        self.cut_normals = np.concatenate(cut_normals) if cuts else np.zeros((0, 3))
        self.cut_colours = np.concatenate(colours) if cuts else np.zeros((0, 3))
        self.labels = labels
        every = np.concatenate([self.artery_points, self.cut_points]) if len(self.artery_points) else self.cut_points
        self.centre = every.mean(axis=0) if len(every) else np.zeros(3)
        radius = float(np.linalg.norm(every - self.centre, axis=1).max()) if len(every) else 1.0
        # drawn with pixels of half a voxel (each point covers 2 x 2 of them), then enlarged to `size`
        self.output_size = size
        self.pixel_mm = max(float(spacing.max()) / 2, 2 * max(radius, 1.0) / (size * 0.9))
        self.size = max(8, int(math.ceil(2 * max(radius, 1.0) / 0.9 / self.pixel_mm)))
        self.splat = max(1, math.ceil(float(spacing.max()) / self.pixel_mm))

    def _project(self, points: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Screen column, row and depth (larger = nearer) of points turned by `angle` about the S axis."""
        cos, sin = math.cos(angle), math.sin(angle)
        x, y, z = (points - self.centre).T
        xr, yr = cos * x - sin * y, sin * x + cos * y
        half = self.size / 2
        return -xr / self.pixel_mm + half, -z / self.pixel_mm + half, yr

    def _zbuffer(self, points: np.ndarray, normals: np.ndarray, angle: float) -> tuple[np.ndarray, ...]:
        """Per covered pixel the nearest point: (pixel ids, depth, shade 0..1, point index), points splatted."""
        if not len(points):
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
        u, v, depth = self._project(points, angle)
        cos, sin = math.cos(angle), math.sin(angle)
        facing = np.abs(sin * normals[:, 0] + cos * normals[:, 1])  # the view direction is +y after the turn
        shade = 0.25 + 0.75 * facing
        number = np.arange(len(points))
        ids, which = [], []
        for du in range(self.splat):
            for dv in range(self.splat):
                col, row = np.floor(u).astype(int) + du, np.floor(v).astype(int) + dv
                keep = (col >= 0) & (col < self.size) & (row >= 0) & (row < self.size)
                ids.append(row[keep] * self.size + col[keep])
                which.append(number[keep])
        pixel, point = np.concatenate(ids), np.concatenate(which)
        order = np.lexsort((-depth[point], pixel))
        chosen = order[np.unique(pixel[order], return_index=True)[1]]
        point = point[chosen]
        return pixel[chosen], depth[point], shade[point], point

    def frame(self, number: int) -> np.ndarray:
        """Frame `number` as (size, size, 3) uint8: cuts opaque, the artery's surface over them at 30 %."""
        angle = math.radians(number * TURN_DEGREES)
        canvas = np.zeros((self.size * self.size, 3), dtype=np.float64)
        cut_depth = np.full(self.size * self.size, -np.inf)
        ids, depth, shade, point = self._zbuffer(self.cut_points, self.cut_normals, angle)
        canvas[ids] = self.cut_colours[point] * shade[:, None]
        cut_depth[ids] = depth
        ids, depth, shade, _ = self._zbuffer(self.artery_points, self.artery_normals, angle)
        grey = np.repeat((ARTERY_GREY * shade)[:, None], 3, axis=1)
        has_cut = np.isfinite(cut_depth[ids])
        in_front = (depth > cut_depth[ids])[:, None]
        canvas[ids] = np.where(
            has_cut[:, None],
            np.where(in_front, ARTERY_OPACITY * grey + (1 - ARTERY_OPACITY) * canvas[ids], canvas[ids]),
            grey,
        )
        small = (np.clip(canvas, 0, 1) * 255).astype(np.uint8).reshape(self.size, self.size, 3)
        pick = np.minimum((np.arange(self.output_size) * self.size / self.output_size).astype(int), self.size - 1)
        image = np.ascontiguousarray(small[pick][:, pick])
        zoom = self.output_size / self.size
        for index, centre in self.labels:
            u, v, _ = self._project(centre[None], angle)
            row, col = int(v[0] * zoom) - GLYPH_HEIGHT, int(u[0] * zoom) - 40
            draw_text(image, str(index), max(0, row), max(0, col), WHITE, scale=3)
        return image


# --------------------------------------------------------------------------------------------- page


def _fit(picture: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour shrink so the longer side is at most `size`."""
    longest = max(picture.shape[:2])
    if longest <= size:
        return picture
    rows = (np.arange(int(picture.shape[0] * size / longest)) * longest / size).astype(int)
    cols = (np.arange(int(picture.shape[1] * size / longest)) * longest / size).astype(int)
    return picture[rows][:, cols]


def page_frames(measurement: PulmonaryMeasurement, frames: int = FRAMES) -> list[np.ndarray]:
    """The report page, once per overview frame: (height, PAGE_WIDTH, 3) uint8 each."""
    footer_lines = [line for paragraph in DISCLAIMER for line in wrap_text(paragraph, PAGE_WIDTH - 20, 1)]
    header, title_row = 80, 36
    main_top = header + 10
    main_height = title_row + max(OVERVIEW, len(measurement.landmarks) * ROW)
    height = main_top + main_height + 20 + len(footer_lines) * (GLYPH_HEIGHT + 4) + 10
    page = np.zeros((height, PAGE_WIDTH, 3), dtype=np.uint8)
    version = str(measurement.metadata.get("version", ""))
    centred_text(page, "Pulmonary Artery Report", 12, 0, PAGE_WIDTH, WHITE, 3)
    centred_text(page, f"version {version}", 40, 0, PAGE_WIDTH, GREY, 1)
    centred_text(page, f"Generated on: {time.strftime('%d.%m.%Y %H:%M:%S')}", 56, 0, PAGE_WIDTH, WHITE, 2)
    left_width = OVERVIEW + 20
    centred_text(page, "Overview", main_top, 0, left_width, WHITE, 2)
    centred_text(page, "Landmarks", main_top, left_width, PAGE_WIDTH - left_width, WHITE, 2)
    for row, (index, landmark) in enumerate(sorted(measurement.landmarks.items())):
        top = main_top + title_row + row * ROW
        left = left_width + 6
        if landmark.present and landmark.slice_ct is not None:
            paste(page, _fit(plane_picture(landmark), PICTURE), top, left)
        else:
            page[top : top + PICTURE, left : left + PICTURE] = 40
        text_left = left + PICTURE + 10
        draw_text(page, f"{index} - {landmark.display_name}", top + 4, text_left, WHITE, 2)
        if landmark.present:
            draw_text(page, f"area: {landmark.area} cm2", top + 30, text_left, GREEN, 2)
            draw_text(page, f"diam: {landmark.diameter} x {landmark.diameter_pd} cm", top + 54, text_left, GREEN, 2)
        else:
            draw_text(page, "not in image", top + 30, text_left, GREY, 2)
    footer_top = main_top + main_height + 20
    draw_footer(page, footer_top, footer_lines, GREY)
    renderer = OverviewRenderer(measurement)
    pages = []
    for number in range(frames):
        frame = page.copy()
        paste(frame, renderer.frame(number), main_top + title_row, 10)
        pages.append(frame)
    return pages


def rgb_frames_nifti(frames: Sequence[np.ndarray]) -> nib.Nifti1Image:
    """The frames as upstream's report NIfTI: its combine_as_nifti (pulmonary and aorta) stacks them last frame first."""
    return rgb_pages_nifti(list(frames)[::-1])


def encode_frame(frame: np.ndarray) -> bytes:
    """One page frame as PNG bytes."""
    return encode_png(np.ascontiguousarray(frame))
