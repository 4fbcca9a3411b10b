"""The animated curved planar reformation (upstream's `totalseg_aorta_report -ca`): a scrollable RGB NIfTI.

Why: a reader scrolls through the aorta from its distal end up to the annulus and sees, at every step,
where the cut lies on the vessel, on the straightened aorta and on the diameter profile, and the cut
itself. Upstream (aorta_report/cpr_animated.py) renders this with VTK (the 3D view), matplotlib (CPR
and profile) and wkhtmltoimage (the page around it); tsrt draws the same four panels with numpy and its
bitmap font, from the same CPR stack as the still overview (tsrt.reports.aorta_cpr).

Kept from upstream, so a PACS shows the same stack: one frame per diameter-profile sample (the profile's
positions stretched onto the CPR's length pick the CPR slice a frame shows; every slice when there is
no profile), frames stored last first as an RGB24 NIfTI (upstream's report layout, tsrt.reports.common),
and the panel sizes: a 28-pixel title row over an 800-pixel-high row of the 3D view (200 wide), the
coronal CPR (its slices' aspect scaled to 800 rows, at least 150 wide), the diameter profile (400) and
the cross-section (280), centred on a page max(content + 48, 900) pixels wide. Upstream's page around
them is an HTML page rendered by a browser, so its header and footer heights (and a few pixels of width)
come from that browser's fonts; tsrt's header and footer are those of its report page.

The 3D view is upstream's camera: the aorta seen from the patient's right (anterior on the left, head
up), stretched to fill the panel, with an orange disk of radius 0.75 x the widest diameter (in report
grid voxels, as upstream's VTK scene measures) across the centerline at the frame's slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tsrt.outputs.font import GLYPH_HEIGHT, draw_text
from tsrt.pipeline.write import atomic_output
from tsrt.reports.aorta_cpr import (
    Straightened, coronal_view, grey_picture, landmark_rows, profile_plot, straighten,
)
from tsrt.reports.aorta_geometry import slice_chords
from tsrt.reports.aorta_render import GREY, HEADER_HEIGHT, WHITE, draw_header, footer_lines, resize_nearest
from tsrt.reports.common import centred_text, draw_footer

if TYPE_CHECKING:
    import nibabel as nib

    from tsrt.reports.aorta_measure import AortaReport

#: Upstream's panel sizes (pixels): the row height, the title row above it, and the fixed panel widths.
PANEL_HEIGHT, TITLE_HEIGHT = 800, 28
WIDTH_3D, WIDTH_PROFILE, WIDTH_SECTION, MIN_CPR_WIDTH = 200, 400, 280, 150
TITLES = ("3D", "Coronal CPR", "Diameter Profile", "Crossectional view")  # upstream's spelling
#: Upstream's page: the content plus 48 pixels, at least 900 pixels wide.
PAGE_MARGIN, MIN_PAGE_WIDTH = 48, 900
#: The cross-section's picture: the panel width less 20, at most half the panel height less 10.
SECTION_SIZE = min(WIDTH_SECTION - 20, PANEL_HEIGHT // 2 - 10)
POSITION_COLOUR = (255, 140, 0)
PLANE_COLOUR, RIM_COLOUR, PLANE_OPACITY, RIM_INNER = (255, 153, 0), (255, 128, 0), 0.85, 0.88
#: The disk's radius: this times the widest diameter (mm), taken as voxels of the report grid (upstream's scene).
PLANE_RADIUS_FACTOR = 0.75
OUTLINE_RED, SECTION_GREEN = (255, 77, 77), (0, 255, 0)
#: Below this area (cm2) the cross-section carries no numbers (upstream's threshold).
MIN_LABELLED_AREA_CM2 = 0.05


# --------------------------------------------------------------------------------------------- layout


def fit_to_display(positions_mm: np.ndarray, display_mm: np.ndarray) -> np.ndarray:
    """The profile's positions stretched onto the CPR's extent (upstream's _fit_curve_positions_to_display).

    The profile may be sampled on a slightly shorter centerline than the CPR, so its first and last
    position are mapped onto the CPR's ends.
    """
    positions, display = np.asarray(positions_mm, dtype=float), np.asarray(display_mm, dtype=float)
    if positions.size == 0 or display.size == 0 or np.isfinite(positions).sum() < 2:
        return positions
    low, high = float(np.nanmin(positions)), float(np.nanmax(positions))
    start, stop = float(np.nanmin(display)), float(np.nanmax(display))
    if abs(high - low) < 1e-8:
        return np.full_like(positions, start)
    return start + (positions - low) * (stop - start) / (high - low)


def frame_slices(profile_positions_mm: np.ndarray | None, slices: int, step_mm: float) -> np.ndarray:
    """The CPR slice each frame shows: one frame per profile sample, or every slice without a profile."""
    display = np.arange(slices)[::-1] * step_mm  # each slice's distance from the annulus end
    if profile_positions_mm is None or len(profile_positions_mm) == 0:
        return np.arange(slices)
    fitted = fit_to_display(profile_positions_mm, display)
    return np.asarray([int(np.argmin(np.abs(display - position))) for position in fitted], dtype=int)


def slice_row(slice_index: int | np.ndarray, slices: int, height: int = PANEL_HEIGHT) -> np.ndarray:
    """The pixel row of a CPR slice's centre in a `height`-row panel (the annulus end, slice slices-1, on top)."""
    return (height - height * (np.asarray(slice_index) + 0.5) / slices).astype(int)


def cpr_width(slices: int, plane_size: int) -> int:
    """The coronal CPR panel's width: the stack's aspect (plane pixels per slice) scaled to 800 rows, >= 150."""
    return max(int(plane_size * PANEL_HEIGHT / slices), MIN_CPR_WIDTH)


@dataclass(frozen=True)
class AnimationLayout:
    """What a frame shows and where: the CPR slice per frame and the pixel sizes of panels and page."""

    slices: np.ndarray  # CPR slice per frame
    cpr_width: int
    footer_rows: int  # footer lines under the content

    @property
    def frames(self) -> int:
        return len(self.slices)

    @property
    def content_size(self) -> tuple[int, int]:
        """(width, height) of the four panels with their titles."""
        return WIDTH_3D + self.cpr_width + WIDTH_PROFILE + WIDTH_SECTION, TITLE_HEIGHT + PANEL_HEIGHT

    @property
    def page_size(self) -> tuple[int, int]:
        width, height = self.content_size
        return max(width + PAGE_MARGIN, MIN_PAGE_WIDTH), HEADER_HEIGHT + height + 24 + self.footer_rows * (
            GLYPH_HEIGHT + 4) + 10

    @property
    def content_origin(self) -> tuple[int, int]:
        """(row, column) of the content's top left corner on the page."""
        return HEADER_HEIGHT, (self.page_size[0] - self.content_size[0]) // 2


def animation_layout(report: AortaReport, straight: Straightened) -> AnimationLayout:
    """The frames and sizes upstream's generate_animated_cpr_nifti gives this report."""
    slices = straight.ct.shape[2]
    profile = None if report.profile is None else report.profile.position_mm
    width = cpr_width(slices, straight.ct.shape[0])
    page_width = max(WIDTH_3D + width + WIDTH_PROFILE + WIDTH_SECTION + PAGE_MARGIN, MIN_PAGE_WIDTH)
    return AnimationLayout(frame_slices(profile, slices, straight.step_mm), width, len(footer_lines(page_width)))


# --------------------------------------------------------------------------------------------- panels


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a background 4-neighbour (outside the picture counts as background).

    The same pixels as pulmonary_geometry.boundary, with shifted arrays: that one erodes through a 3D
    distance transform, 100x slower on a frame's pictures.
    """
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _thick_outline(mask: np.ndarray) -> np.ndarray:
    """A two-pixel outline: the mask's border pixels and the background pixels touching them."""
    return outline(mask) | (outline(~np.pad(mask, 1, constant_values=True))[1:-1, 1:-1])


class SideView:
    """The aorta from the patient's right (anterior left, head up), stretched onto the 3D panel, and a disk in it.

    The report grid is RAS: pixels run along -y (columns) and -z (rows); the nearer the surface to the
    right side, the brighter. A cutting disk (centre, normal, radius in voxels) projects to an ellipse:
    semi-axis r across the normal's in-view direction and r * |normal_x| along it.
    """

    def __init__(self, aorta: np.ndarray, pad_voxels: int = 8, size: tuple[int, int] = (PANEL_HEIGHT, WIDTH_3D)):
        hit = aorta.any(axis=0)  # (y, z)
        found = np.argwhere(hit)
        low, high = (found.min(axis=0), found.max(axis=0)) if len(found) else (np.zeros(2), np.array(hit.shape) - 1)
        low, high = low - pad_voxels, high + pad_voxels
        height, width = size
        # output pixel centres in voxel coordinates: columns from anterior (high y), rows from the head (high z)
        self.y = high[0] + 0.5 - (np.arange(width) + 0.5) * (high[0] - low[0] + 1) / width
        self.z = high[1] + 0.5 - (np.arange(height) + 0.5) * (high[1] - low[1] + 1) / height
        yi = np.clip(np.floor(self.y).astype(int), 0, hit.shape[0] - 1)
        zi = np.clip(np.floor(self.z).astype(int), 0, hit.shape[1] - 1)
        inside_y = (self.y >= 0) & (self.y < hit.shape[0])
        inside_z = (self.z >= 0) & (self.z < hit.shape[1])
        depth = np.argmax(aorta, axis=0).astype(np.float64)  # first voxel from the right (low x)
        near = 1.0 - (depth - depth[hit].min()) / max(float(np.ptp(depth[hit])), 1.0) if hit.any() else depth
        seen = hit[yi[None, :], zi[:, None]] & inside_y[None, :] & inside_z[:, None]
        level = np.where(seen, 40 + 50 * near[yi[None, :], zi[:, None]], 0.0)
        self.base = np.repeat(level[..., None], 3, axis=2).astype(np.float64)

    def with_disk(self, centre: Sequence[float], normal: Sequence[float], radius: float) -> np.ndarray:
        """The view with an orange disk across the aorta (RGB uint8)."""
        normal = np.asarray(normal, dtype=float)
        normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
        dy, dz = self.y[None, :] - centre[1], self.z[:, None] - centre[2]
        in_view = np.hypot(normal[1], normal[2])
        if in_view < 1e-6:  # facing the camera: a circle
            across, along, minor = np.hypot(dy, dz), np.zeros_like(dy * dz), radius
        else:
            e = np.array([normal[1], normal[2]]) / in_view
            across, along = dy * -e[1] + dz * e[0], dy * e[0] + dz * e[1]
            minor = max(radius * abs(normal[0]), 0.5)

        def inside(scale: float) -> np.ndarray:
            r, m = radius * scale, max(minor * scale, 0.5)
            return (across / r) ** 2 + (along / m) ** 2 <= 1.0

        disk, inner = inside(1.0), inside(RIM_INNER)
        picture = self.base.copy()
        picture[disk] = PLANE_OPACITY * np.asarray(PLANE_COLOUR) + (1 - PLANE_OPACITY) * picture[disk]
        picture[disk & ~inner] = RIM_COLOUR
        return picture.astype(np.uint8)


def cpr_panel(straight: Straightened, width: int) -> np.ndarray:
    """The coronal CPR (annulus on top) stretched to 800 rows x `width`, the aorta outlined in red."""
    picture = resize_nearest(grey_picture(coronal_view(straight.ct)), PANEL_HEIGHT, width)
    mask = resize_nearest(coronal_view(straight.mask) > 0, PANEL_HEIGHT, width)
    picture[outline(mask)] = OUTLINE_RED
    return picture


def section_panel(ct_slice: np.ndarray, mask_slice: np.ndarray, pixel_mm: float) -> np.ndarray:
    """The cut across the aorta (its outline green), with its area and both diameters when it has any."""
    panel = np.zeros((PANEL_HEIGHT, WIDTH_SECTION, 3), dtype=np.uint8)
    picture = resize_nearest(grey_picture(ct_slice.T[::-1]), SECTION_SIZE, SECTION_SIZE)
    mask = resize_nearest(mask_slice.T[::-1] > 0, SECTION_SIZE, SECTION_SIZE)
    if mask.any():
        picture[_thick_outline(mask)] = SECTION_GREEN
    left = (WIDTH_SECTION - SECTION_SIZE) // 2
    panel[10 : 10 + SECTION_SIZE, left : left + SECTION_SIZE] = picture
    area_cm2 = float(mask_slice.sum()) * pixel_mm**2 / 100
    if area_cm2 > MIN_LABELLED_AREA_CM2:
        diameter, perpendicular, _, _ = slice_chords(mask_slice.astype(np.uint8), [pixel_mm] * 2, np.eye(4), z=0)
        top = 10 + SECTION_SIZE + 14
        draw_text(panel, f"Area: {area_cm2:.1f} cm2", top, left, SECTION_GREEN, 2)
        draw_text(panel, f"Diam: {float(diameter) / 10:.1f} x {float(perpendicular) / 10:.1f} cm", top + 22, left,
                  SECTION_GREEN, 2)
    return panel


def _with_position_line(panel: np.ndarray, row: int) -> np.ndarray:
    marked = panel.copy()
    row = int(np.clip(row, 1, marked.shape[0] - 2))
    marked[row - 1 : row + 2] = POSITION_COLOUR
    return marked


# --------------------------------------------------------------------------------------------- frames


def render_frames(
    report: AortaReport, straight: Straightened | None = None
) -> tuple[AnimationLayout, Iterator[np.ndarray]]:
    """The layout and the frames (page-sized RGB uint8, distal end first), drawn one at a time.

    Each frame is the same array redrawn: copy it before asking for the next one.
    """
    straight = straight if straight is not None else straighten(report)
    layout = animation_layout(report, straight)
    slices = straight.ct.shape[2]
    rows = slice_row(layout.slices, slices)
    cpr = cpr_panel(straight, layout.cpr_width)
    profile = profile_plot(report, landmark_rows(report, straight), slices, PANEL_HEIGHT, WIDTH_PROFILE,
                            top=int(rows.min()), bottom=int(rows.max()))
    view = SideView(report.grid.aorta > 0)
    tangents = np.gradient(straight.line_voxels, axis=0)  # upstream's plane normals (straighten gives >= 2 slices)
    radius = report.max_diameter_mm * PLANE_RADIUS_FACTOR
    page_width, page_height = layout.page_size
    page = np.zeros((page_height, page_width, 3), dtype=np.uint8)
    draw_header(page, report.json["metadata"])
    content_top, content_left = layout.content_origin
    draw_footer(page, content_top + layout.content_size[1] + 24, footer_lines(page_width), GREY)
    widths = (WIDTH_3D, layout.cpr_width, WIDTH_PROFILE, WIDTH_SECTION)
    lefts = content_left + np.concatenate([[0], np.cumsum(widths)[:-1]])
    for title, left, width in zip(TITLES, lefts, widths):
        centred_text(page, title, content_top + 6, int(left), width, WHITE, 2)

    def frames() -> Iterator[np.ndarray]:
        top = content_top + TITLE_HEIGHT
        for slice_index, row in zip(layout.slices, rows):
            panels = (
                view.with_disk(straight.line_voxels[slice_index], tangents[slice_index], radius),
                _with_position_line(cpr, row),
                _with_position_line(profile, row),
                section_panel(straight.ct[:, :, slice_index], straight.mask[:, :, slice_index], straight.pixel_mm),
            )
            for panel, left in zip(panels, lefts):
                page[top : top + PANEL_HEIGHT, left : left + panel.shape[1]] = panel
            yield page

    return layout, frames()


def frames_nifti(frames: Iterator[np.ndarray], count: int, size: tuple[int, int]) -> nib.Nifti1Image:
    """`count` frames of `size` (width, height) as upstream's report NIfTI stores them, filled one at a time.

    Equal to tsrt.reports.common.rgb_pages_nifti(frames[::-1]) (upstream's combine_as_nifti) without
    holding every frame twice: frame k goes to slice count-1-k, turned so that voxel (x, y) holds
    pixel (row y, column x-1) and the canvas keeps one spare column (x = 0) and row (y = height).
    """
    import nibabel as nib

    width, height = size
    canvas = np.zeros((width + 1, height + 1, count, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        canvas[1:, :height, count - 1 - index] = frame.transpose(1, 0, 2)
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nib.Nifti1Image(canvas.view(rgb).reshape(canvas.shape[:-1]), np.diag([-1.0, -1.0, 1.0, 1.0]))


def write_cpr_animation(report: AortaReport, path: Path, straight: Straightened | None = None) -> Path:
    """The animated CPR as an RGB NIfTI at `path` (written to a temp file, then renamed)."""
    import nibabel as nib

    layout, frames = render_frames(report, straight)
    image = frames_nifti(frames, layout.frames, layout.page_size)
    with atomic_output(Path(path)) as temp:
        nib.save(image, temp)
    return Path(path)


__all__ = [
    "AnimationLayout", "SideView", "animation_layout", "cpr_width", "fit_to_display", "frame_slices", "frames_nifti",
    "outline", "render_frames", "slice_row", "write_cpr_animation",
]
