"""A preview PNG: axial, coronal and sagittal slices with the segmentation overlaid in colour.

Written with numpy and zlib only (a PNG is a few zlib-compressed rows), so the runtime-only
install can make it without matplotlib or a display.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.pipeline.label_table import label_colours
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


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[int, str] | None = None,
    *,
    window_name: str = "soft_tissue",
    alpha: float = 0.45,
) -> np.ndarray:
    """Three orthogonal slices through the centre of the segmented anatomy, side by side (RGB)."""
    image_ras, spacing = to_ras(image, affine)
    labels_ras, _ = to_ras(labels, affine)
    found = np.argwhere(labels_ras > 0)
    centre = found.mean(axis=0).round().astype(int) if len(found) else np.array(labels_ras.shape) // 2
    grey = window(image_ras, *WINDOWS[window_name])
    n_colours = int(max(labels_ras.max(), max(label_names or {0: ""}))) if labels_ras.size else 0
    colours = label_colours(n_colours)
    pixel_mm = float(min(spacing))
    panels = []
    for view, axis in VIEW_AXES.items():
        g = orthogonal_slice(grey, spacing, view, int(centre[axis]), pixel_mm)
        lab = orthogonal_slice(labels_ras, spacing, view, int(centre[axis]), pixel_mm)
        panels.append(blend_overlay(g, lab, colours, alpha))
    height = max(p.shape[0] for p in panels)
    gap = np.zeros((height, 4, 3), dtype=np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)


def write_preview(path: Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray, label_names=None) -> Path:
    """Render and write the preview PNG atomically."""
    with atomic_output(Path(path)) as temp:
        temp.write_bytes(encode_png(render_preview(image, labels, affine, label_names)))
    return Path(path)
