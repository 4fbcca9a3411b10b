"""Per-structure statistics (`statistics.json`), with TotalSegmentator's keys and rules.

For each class: `volume` in mm³ and mean `intensity` of the image inside the mask (the image cast to
int16 first, as TotalSegmentator does). A mask within 3 voxels of the volume border is incomplete,
so TotalSegmentator reports it as 0 volume and 0 intensity by default; so do we.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tsrt.pipeline.write import write_json


def touches_border(mask: np.ndarray, margin: int = 3) -> bool:
    """True when any voxel of `mask` lies in the outer `margin` slices of any axis."""
    for axis in range(mask.ndim):
        index = [slice(None)] * mask.ndim
        index[axis] = slice(0, margin)
        if mask[tuple(index)].any():
            return True
        index[axis] = slice(-margin, None)
        if mask[tuple(index)].any():
            return True
    return False


def structure_statistics(
    labels: np.ndarray,
    image: np.ndarray,
    spacing: tuple[float, float, float],
    label_names: Mapping[int, str],
    *,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
    normalized_intensities: bool = False,
) -> dict[str, dict[str, float]]:
    """Volume (mm³) and intensity per named label; `labels` and `image` share one voxel grid.

    `normalized_intensities` scales the int16 image to 0..1 by its min and max first (TotalSegmentator's
    option for images whose values are not HU, e.g. its MR modality check).
    """
    voxel_volume = float(spacing[0] * spacing[1] * spacing[2])
    intensities = image.astype(np.int16)
    if normalized_intensities:
        intensities = min_max_scaled(intensities)
    stats: dict[str, dict[str, float]] = {}
    for label, name in label_names.items():
        mask = labels == label
        count = int(mask.sum())
        if count == 0 or (exclude_masks_at_border and touches_border(mask)):
            stats[name] = {"volume": 0.0, "intensity": 0.0}
            continue
        values = intensities[mask]
        value = np.median(values) if metric == "median" else values.mean(dtype=np.float64)
        stats[name] = {"volume": count * voxel_volume, "intensity": float(np.round(value, 5))}  # numpy's rounding, as upstream
    return stats


def min_max_scaled(intensities: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) in upstream's arithmetic: differences in int16 (wrapping as numpy does), then float64."""
    low, high = intensities.min(), intensities.max()
    span = np.subtract(np.array(high), np.array(low), dtype=intensities.dtype, casting="unsafe")
    return np.subtract(intensities, low, dtype=intensities.dtype, casting="unsafe") / span


def write_statistics(stats: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Write statistics.json atomically (never a half-written file)."""
    return write_json(stats, Path(path))
