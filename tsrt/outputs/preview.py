"""A preview PNG: axial, coronal and sagittal slices with the segmentation overlaid in colour, and a legend.

Written with numpy and zlib only (a PNG is a few zlib-compressed rows; names use tsrt.outputs.font),
so the runtime-only install can make it without matplotlib, PIL or a display. At least MIN_WIDTH
pixels wide, windowed by modality (CT: soft tissue; MR: the body's 1st..99th percentile), coloured with
the label table's palette - the same picture `--preview`, `tsrt demo` and the UI's overview show.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.outputs.font import ADVANCE, CAP_HEIGHT, GLYPH_HEIGHT, draw_text, text_width
from tsrt.pipeline.label_table import label_colour, label_colours
from tsrt.pipeline.write import atomic_output

WINDOWS = {"soft_tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}


def window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map intensities to 0-255 grey with a window/level, as a radiology viewer does."""
    low = level - width / 2
    return (np.clip((image.astype(np.float32) - low) / width, 0, 1) * 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as a PNG file."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to RAS+ voxel order (index grows to the patient's right, anterior, superior); returns it and its spacing."""
    orientation = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, orientation)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[np.argsort(orientation[:, 0])]
    return ras, spacing


def _stretch(panel: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float) -> np.ndarray:
    """Nearest-neighbour resize so every pixel is `pixel_mm` square (true anatomical proportions)."""
    rows = max(1, int(round(panel.shape[0] * row_mm / pixel_mm)))
    cols = max(1, int(round(panel.shape[1] * col_mm / pixel_mm)))
    r = np.minimum((np.arange(rows) * pixel_mm / row_mm).astype(int), panel.shape[0] - 1)
    c = np.minimum((np.arange(cols) * pixel_mm / col_mm).astype(int), panel.shape[1] - 1)
    return panel[r][:, c]


#: The three orthogonal views, each with the RAS axis it cuts.
VIEW_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}


def orthogonal_slice(
    volume_ras: np.ndarray, spacing: Sequence[float], view: str, index: int, pixel_mm: float
) -> np.ndarray:
    """Slice `index` of a RAS-ordered volume as a radiology viewer shows it, with square `pixel_mm` pixels.

    Radiological convention: axial and coronal views show the patient's right on the image's left;
    axial has anterior at the top, coronal and sagittal superior at the top, sagittal anterior on the left.
    """
    axis = VIEW_AXES[view]
    cols_axis, rows_axis = (a for a in range(3) if a != axis)
    cut = np.take(volume_ras, index, axis=axis)  # (cols_axis, rows_axis)
    # Transposed so the later RAS axis runs down the rows; both reversed (anterior/superior up, right/anterior left).
    panel = cut.T[::-1, ::-1]
    return _stretch(panel, float(spacing[rows_axis]), float(spacing[cols_axis]), pixel_mm)


def blend_overlay(
    grey: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float, visible: Iterable[int] | None = None
) -> np.ndarray:
    """Grey panel (H, W) with each label's colour mixed in at `alpha`; only `visible` labels when given (RGB uint8)."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    overlay = labels > 0 if visible is None else np.isin(labels, list(visible)) & (labels > 0)
    rgb[overlay] = (1 - alpha) * rgb[overlay] + alpha * colours[labels[overlay]]
    return rgb.astype(np.uint8)


#: The preview is at least this wide, so it reads at a glance (small volumes are enlarged to fill it).
MIN_WIDTH = 1200
#: Panels are shrunk (never below MIN_WIDTH overall) so a whole-body scan's tall views stay on a screen.
MAX_PANEL_HEIGHT = 900
MARGIN, GAP = 8, 8
TEXT_SCALE = 2
LINE_HEIGHT = GLYPH_HEIGHT * TEXT_SCALE + 4
SWATCH = CAP_HEIGHT * TEXT_SCALE  # a legend colour square, as tall as a capital letter
TEXT_COLOUR = (255, 255, 255)  # not in the palette, so a legend swatch never looks like text
#: A CT has air (-1000 HU) or fat (-100 HU) in nearly every scan; an MR (or a PET) has no values that low.
CT_LOWEST_HU = -200.0


def looks_like_ct(image: np.ndarray, modality: str | None = None) -> bool:
    """Whether the image is a CT: the DICOM modality when known, else its values (HU go far below zero)."""
    if modality:
        return modality.strip().upper() == "CT"
    sample = np.asarray(image)[::2, ::2, ::2]
    return bool(sample.size) and float(np.percentile(sample, 0.5)) < CT_LOWEST_HU


def body_percentile_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """(level, width) spanning the `low`..`high` percentile of the body (MR has no HU to fix a window).

    The body is what is brighter than a tenth of the image's range, so the dark background around the
    patient does not pull the window down.
    """
    sample = np.asarray(image)[::2, ::2, ::2].astype(np.float32).ravel()
    if not sample.size:
        return 0.0, 1.0
    floor, ceiling = np.percentile(sample, [low, high])
    body = sample[sample > floor + 0.1 * (ceiling - floor)]
    bottom, top = np.percentile(body if body.size >= 100 else sample, [low, high])
    return float(bottom + top) / 2, max(float(top - bottom), 1.0)


def preview_window(image: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """The preview's (level, width): the soft-tissue window for CT, the body's 1st..99th percentile otherwise."""
    return WINDOWS["soft_tissue"] if looks_like_ct(image, modality) else body_percentile_window(image)


@dataclass(frozen=True)
class LegendEntry:
    """One structure in the legend: its colour swatch's top-left corner (legend coordinates) and name."""

    label: int
    name: str
    top: int
    left: int

    @property
    def text_left(self) -> int:
        return self.left + SWATCH + TEXT_SCALE * 3


def legend_entries(present: Sequence[int], label_names: Mapping[int, str], width: int) -> list[LegendEntry]:
    """Where each present structure goes: sorted by label, down the columns, as many columns as fit `width`."""
    labels = sorted(int(label) for label in present if label > 0)
    if not labels:
        return []
    room = width - 2 * MARGIN
    longest_chars = (room - SWATCH - TEXT_SCALE * 3) // (ADVANCE * TEXT_SCALE)
    names = [str(label_names.get(label, f"label {label}"))[:longest_chars] for label in labels]
    column = SWATCH + TEXT_SCALE * 3 + max(text_width(name, TEXT_SCALE) for name in names) + 3 * GAP
    columns = max(1, min(len(labels), (room + 3 * GAP) // column))
    rows = -(-len(labels) // columns)
    return [
        LegendEntry(label, name, GAP + (i % rows) * LINE_HEIGHT, MARGIN + (i // rows) * column)
        for i, (label, name) in enumerate(zip(labels, names))
    ]


def render_legend(entries: Sequence[LegendEntry], width: int) -> np.ndarray:
    """The legend strip: a palette swatch and the structure name per entry (RGB, black background)."""
    height = (max(entry.top for entry in entries) + LINE_HEIGHT + GAP) if entries else 0
    legend = np.zeros((height, width, 3), dtype=np.uint8)
    for entry in entries:
        legend[entry.top : entry.top + SWATCH, entry.left : entry.left + SWATCH] = label_colour(entry.label)
        draw_text(legend, entry.name, entry.top, entry.text_left, TEXT_COLOUR, TEXT_SCALE)
    return legend


def panel_pixel_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The pixel size that makes the three panels side by side MIN_WIDTH wide (enlarging small volumes)."""
    extent = [n * float(s) for n, s in zip(shape, spacing)]
    across = sum(extent[a] for a in (0, 0, 1))  # axial and coronal run right-left, sagittal anterior-posterior
    pixel_mm = across / (MIN_WIDTH - 2 * MARGIN - 2 * GAP)
    return max(pixel_mm, max(extent[1], extent[2]) / MAX_PANEL_HEIGHT)


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[int, str] | None = None,
    *,
    modality: str | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Axial, coronal and sagittal slices through the centre of the segmented anatomy, named, with a legend (RGB).

    At least MIN_WIDTH pixels wide; the window is chosen by `modality` (see `preview_window`); the legend
    lists the structures present in `labels`, in the label table's colours.
    """
    image_ras, spacing = to_ras(image, affine)
    labels_ras, _ = to_ras(labels, affine)
    found = np.argwhere(labels_ras > 0)
    centre = found.mean(axis=0).round().astype(int) if len(found) else np.array(labels_ras.shape) // 2
    level_width = preview_window(image_ras, modality)
    counts = np.bincount(labels_ras.ravel().astype(np.intp, copy=False)) if labels_ras.size else np.zeros(1)
    present = [int(label) for label in np.flatnonzero(counts) if label > 0]  # bincount: a sort of every voxel is slow
    n_colours = max(present + [int(max(label_names or {0: ""}))])
    colours = label_colours(n_colours)
    pixel_mm = panel_pixel_mm(labels_ras.shape, spacing)
    panels = []
    for view, axis in VIEW_AXES.items():
        g = window(orthogonal_slice(image_ras, spacing, view, int(centre[axis]), pixel_mm), *level_width)
        lab = orthogonal_slice(labels_ras, spacing, view, int(centre[axis]), pixel_mm)
        panels.append((view, blend_overlay(g, lab, colours, alpha)))
    content = sum(panel.shape[1] for _, panel in panels) + GAP * (len(panels) - 1)
    width = max(MIN_WIDTH, content + 2 * MARGIN)
    top = MARGIN + LINE_HEIGHT
    canvas = np.zeros((top + max(panel.shape[0] for _, panel in panels), width, 3), dtype=np.uint8)
    left = (width - content) // 2
    for view, panel in panels:
        draw_text(canvas, view, MARGIN, left, TEXT_COLOUR, TEXT_SCALE)
        canvas[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + GAP
    legend = render_legend(legend_entries(present, label_names or {}, width), width)
    return np.concatenate([canvas, legend], axis=0)


def write_preview(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[int, str] | None = None,
    modality: str | None = None,
) -> Path:
    """Render and write the preview PNG atomically (`modality`: the DICOM modality when known)."""
    with atomic_output(Path(path)) as temp:
        temp.write_bytes(encode_png(render_preview(image, labels, affine, label_names, modality=modality)))
    return Path(path)
