"""Curved planar reformation (CPR) of the aorta: the vessel straightened along its centerline (upstream's -c).

Why: a straightened aorta shows its whole length in one picture, with the diameter profile beside it.
As aorta_report/cpr.py: the centerline is resampled every (smallest voxel size) mm, smoothed (Gaussian,
sigma 2 points, ends kept), and carried along with rotation-minimising (parallel transport) frames;
each slice samples a square plane (1.6 x the widest diameter, at least 48 mm; pixels 0.6..1 mm)
with cubic splines from the CT and linear interpolation from the mask (> 0.5). The overview shows
the middle sagittal and coronal cuts of that stack with the aorta's outline, the landmarks as
lines, and the diameter profile - drawn with numpy and tsrt's font instead of matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tsrt.outputs.font import GLYPH_HEIGHT, draw_text
from tsrt.reports import aorta_centerline as cl
from tsrt.reports.common import centred_text
from tsrt.reports.pulmonary_geometry import boundary
from tsrt.reports.pulmonary_render import draw_line

if TYPE_CHECKING:
    from tsrt.reports.aorta_measure import AortaReport

WINDOW = (-700.0, 1000.0)
CURVES = (("aorta", (247, 198, 106)), ("true lumen", (124, 252, 112)), ("false lumen", (255, 107, 107)))


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = np.linalg.norm(vector)
    return None if norm < 1e-8 else vector / norm


def _rotation(a: np.ndarray, b: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The rotation turning unit vector a onto b (a half-turn about `fallback`'s perpendicular part if opposite)."""
    cross = np.cross(a, b)
    sine, cosine = np.linalg.norm(cross), np.clip(np.dot(a, b), -1.0, 1.0)
    if sine >= 1e-8:
        axis, angle = cross / sine, np.arctan2(sine, cosine)
    elif cosine > 0.999999:
        return np.eye(3)
    else:
        axis = _unit(fallback - np.dot(fallback, a) * a)
        if axis is None:
            axis = next(v for v in (_unit(c - np.dot(c, a) * a) for c in np.eye(3)) if v is not None)
        angle = np.pi
    x, y, z = axis
    skew = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle) * skew + (1.0 - np.cos(angle)) * (skew @ skew)


def frames(points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normals and binormals along the curve that turn as little as possible (parallel transport)."""
    tangents = np.zeros_like(points_mm)
    tangents[0], tangents[-1] = points_mm[1] - points_mm[0], points_mm[-1] - points_mm[-2]
    if len(points_mm) > 2:
        tangents[1:-1] = points_mm[2:] - points_mm[:-2]
    for index in range(len(tangents)):
        unit = _unit(tangents[index])
        tangents[index] = unit if unit is not None else (tangents[index - 1] if index else _unit(tangents[1]))
    normals, binormals = np.zeros_like(tangents), np.zeros_like(tangents)
    reference = np.eye(3)[np.argmin(np.abs(np.eye(3) @ tangents[0]))]
    normal = _unit(reference - np.dot(reference, tangents[0]) * tangents[0])
    binormals[0] = _unit(np.cross(tangents[0], normal))
    normals[0] = _unit(np.cross(binormals[0], tangents[0]))
    for index in range(1, len(tangents)):
        t = tangents[index]
        normal = _rotation(tangents[index - 1], t, normals[index - 1]) @ normals[index - 1]
        normal = _unit(normal - np.dot(normal, t) * t)
        if normal is None:
            reference = np.eye(3)[np.argmin(np.abs(np.eye(3) @ t))]
            normal = _unit(reference - np.dot(reference, t) * t)
        if normal is None:
            normal = normals[index - 1]
        binormal = _unit(np.cross(t, normal))
        binormal = binormals[index - 1] if binormal is None else binormal
        normal = _unit(np.cross(binormal, t))
        if np.dot(normal, normals[index - 1]) < 0:
            normal, binormal = -normal, -binormal
        normals[index], binormals[index] = normal, binormal
    return normals, binormals


@dataclass
class Straightened:
    """The CPR stack and the smoothed centerline it was sampled along (what the still and the animation draw)."""

    ct: np.ndarray  # (plane, plane, slices) int16, slice 0 at the distal end
    mask: np.ndarray  # the aorta on the same planes (uint8)
    pixel_mm: float  # in-plane pixel size
    positions_mm: np.ndarray  # each slice's arc length from the distal end
    line_voxels: np.ndarray  # each slice's centre on the report grid (voxels)
    step_mm: float  # the slice distance asked for: the report grid's smallest voxel size (upstream's step)


def straighten(report: AortaReport) -> Straightened:
    """The CPR stack of the report's aorta, sampled as upstream's cpr() samples it."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter1d, map_coordinates, spline_filter

    grid = report.grid
    affine = grid.affine
    step = float(np.min(grid.spacing))
    points = report.centerline.points
    world = nib.affines.apply_affine(affine, points)
    total = float(np.linalg.norm(np.diff(world, axis=0), axis=1).sum())
    positions = np.linspace(0.0, total, max(2, int(np.ceil(total / step)) + 1))
    line = cl.resample_by_arc_length(world, positions)
    if len(line) >= 5:
        ends = line[[0, -1]].copy()
        line = gaussian_filter1d(line, sigma=2.0, axis=0, mode="nearest")
        line[[0, -1]] = ends
    normals, binormals = frames(line)
    pixel = float(np.clip(step, 0.6, 1.0))
    size = max(int(np.ceil(max(report.max_diameter_mm * 1.6, 48.0) / pixel)), 32)
    size += 1 - size % 2
    axis_mm = (np.arange(size) - (size - 1) / 2.0) * pixel
    u, v = np.meshgrid(axis_mm, axis_mm, indexing="ij")
    ct = report.ct if report.ct is not None else np.where(grid.aorta > 0, 300.0, -100.0)
    coefficients = spline_filter(np.asarray(ct, dtype=np.float32), order=3, output=np.float32)
    inverse = np.linalg.inv(affine)
    stack_ct = np.empty((size, size, len(line)), dtype=np.float32)
    stack_mask = np.empty((size, size, len(line)), dtype=np.uint8)
    mask = (grid.aorta > 0.5).astype(np.float32)
    for index in range(len(line)):
        plane = line[index] + u[..., None] * normals[index] + v[..., None] * binormals[index]
        voxels = (plane.reshape(-1, 3) @ inverse[:3, :3].T + inverse[:3, 3]).T
        stack_ct[:, :, index] = map_coordinates(coefficients, voxels, order=3, mode="constant", cval=float(ct.min()),
                                                prefilter=False).reshape(size, size)
        stack_mask[:, :, index] = map_coordinates(mask, voxels, order=1, mode="constant").reshape(size, size) > 0.5
    stack_ct = np.clip(np.rint(stack_ct), -32768, 32767).astype(np.int16)
    return Straightened(stack_ct, stack_mask, pixel, positions, nib.affines.apply_affine(inverse, line), step)


def coronal_view(stack: np.ndarray) -> np.ndarray:
    """The stack's middle coronal cut, annulus at the top (upstream's ct[:, mid, :].T[::-1, ::-1])."""
    return stack[:, stack.shape[1] // 2].T[::-1, ::-1]


def grey_picture(image: np.ndarray) -> np.ndarray:
    """CT values as an RGB picture in upstream's CPR window (-700..1000 HU)."""
    low, high = WINDOW
    grey = (np.clip((image.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def landmark_rows(report: AortaReport, straight: Straightened) -> dict[int, int]:
    """Each found landmark's row in the CPR views (row 0: the annulus end at the top)."""
    lengths = cl.arc_lengths(report.centerline.points, report.grid.spacing)
    slices = len(straight.positions_mm)
    rows = {}
    for number, landmark in report.landmarks.items():
        if not landmark.empty and landmark.index is not None:
            slice_index = int(np.argmin(np.abs(straight.positions_mm - lengths[landmark.index])))
            rows[number] = slices - 1 - slice_index
    return rows


def render_cpr_overview(report: AortaReport, height: int = 900, straight: Straightened | None = None) -> np.ndarray:
    """Sagittal and coronal CPR (annulus at the top) with the outline and landmarks, and the diameter profile."""
    straight = straight if straight is not None else straighten(report)
    stack_ct, stack_mask = straight.ct, straight.mask
    slices = stack_ct.shape[2]
    views = [stack_ct[stack_ct.shape[0] // 2].T[::-1, ::-1], coronal_view(stack_ct)]
    masks = [stack_mask[stack_mask.shape[0] // 2].T[::-1, ::-1], coronal_view(stack_mask)]
    rows = landmark_rows(report, straight)
    scale = height / slices
    panels = []
    for view, outline_mask in zip(views, masks):
        picture = grey_picture(view)
        picture[boundary(outline_mask > 0)] = (255, 77, 77)
        for row in rows.values():
            picture[row] = (picture[row] * 0.6 + 100).astype(np.uint8)
        r = np.minimum((np.arange(height) / scale).astype(int), slices - 1)
        width = max(1, int(picture.shape[1] * scale))
        c = np.minimum((np.arange(width) / scale).astype(int), picture.shape[1] - 1)
        panels.append(picture[r][:, c])
    plot = profile_plot(report, rows, slices, height)
    top = 40
    canvas = np.zeros((height + top + 30, sum(p.shape[1] for p in panels) + plot.shape[1] + 60, 3), dtype=np.uint8)
    left = 10
    for title, panel in zip(("Sagittal CPR", "Coronal CPR", "Diameter Profile"), (*panels, plot)):
        centred_text(canvas, title, 10, left, panel.shape[1], (255, 255, 255), 2)
        canvas[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + 20
    return canvas


def profile_plot(
    report: AortaReport, rows: dict[int, int], slices: int, height: int, width: int = 420, top: int = 10,
    bottom: int | None = None,
) -> np.ndarray:
    """Diameter (mm, across) against distance from the annulus (down), one curve per mask, landmarks labelled.

    The annulus lies on pixel row `top`, the distal end on `bottom` (default: 30 rows above the foot),
    so the animation can line the profile up with its CPR panel.
    """
    plot = np.zeros((height, width, 3), dtype=np.uint8)
    profile = report.profile
    curves = [profile.aorta_mm, profile.true_lumen_mm, profile.false_lumen_mm] if profile is not None else []
    finite = [c[np.isfinite(c)] for c in curves if np.isfinite(c).any()]
    widest = max([10.0] + [float(c.max()) for c in finite])
    span = max(float(np.nanmax(profile.position_mm)) if profile is not None and len(profile.position_mm) else 1.0, 1.0)
    x_of = lambda mm: 50 + mm / (widest * 1.45) * (width - 60)  # noqa: E731
    bottom = height - 30 if bottom is None else bottom
    y_of = lambda mm: top + mm / span * (bottom - top)  # noqa: E731
    plot[top:bottom, 50] = 120
    plot[bottom, 50 : width - 10] = 120
    labels = bottom + 8 if bottom + 8 + GLYPH_HEIGHT <= height else bottom - 8 - GLYPH_HEIGHT
    for tick in range(0, int(widest * 1.45) + 1, 10):
        col = int(x_of(tick))
        if col < width - 10:
            plot[bottom : bottom + 5, col] = 120
            draw_text(plot, str(tick), labels, max(0, col - 6), (200, 200, 200), 1)
    for number, row in rows.items():
        y = int(top + row / max(slices - 1, 1) * (bottom - top))
        plot[y, 51 : width - 10] = 60
        draw_text(plot, str(number), max(0, y - GLYPH_HEIGHT // 2), width - 24, (255, 255, 255), 1)
    for curve, (_, colour) in zip(curves, CURVES):
        keep = np.isfinite(curve)
        points = [(y_of(p), x_of(d)) for p, d in zip(profile.position_mm[keep], curve[keep])]
        for a, b in zip(points[:-1], points[1:]):
            draw_line(plot, a, b, colour, 2)
    return plot
