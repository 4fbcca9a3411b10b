"""The result viewer's pictures: a windowed CT/MR slice with a colour overlay per structure (numpy only).

Slicing, orientation (radiological convention) and blending are `tsrt.outputs.preview`'s, so the viewer
and the overview PNG always agree; this adds window presets, slice choice and per-structure toggles.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from tsrt.outputs.preview import (
    VIEW_AXES, WINDOWS, blend_overlay, body_percentile_window, orthogonal_slice, to_ras, window,
)
from tsrt.pipeline.label_table import label_colours

VIEWS = tuple(VIEW_AXES)
#: Window presets (level, width) in HU; "Auto" spans the body's 1st..99th percentile (MR has no HU), as the overview.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "Soft tissue": WINDOWS["soft_tissue"],
    "Lung": WINDOWS["lung"],
    "Bone": WINDOWS["bone"],
    "Auto": None,
}
DEFAULT_ALPHA = 0.45
#: Small volumes are enlarged (whole pixels, no smoothing) to at least this many pixels on the long side.
MIN_DISPLAY_PIXELS = 384


@dataclass
class SliceViewer:
    """A volume and its labels in RAS order, ready to cut along any view."""

    image: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray
    colours: np.ndarray  # RGB per label number, as in the overview PNG
    _auto_window: tuple[float, float] | None = None

    @classmethod
    def from_volume(cls, values: np.ndarray, labels: np.ndarray, affine: np.ndarray, n_labels: int) -> SliceViewer:
        image_ras, spacing = to_ras(values, affine)
        labels_ras, _ = to_ras(labels, affine)
        highest = max(int(labels_ras.max(initial=0)), n_labels)
        return cls(image_ras, labels_ras, spacing, label_colours(highest))

    def size(self, view: str) -> int:
        return int(self.image.shape[VIEW_AXES[view]])

    def centre(self) -> dict[str, int]:
        """Slice numbers through the centre of the segmented anatomy (of the volume when nothing was found)."""
        found = np.argwhere(self.labels[::2, ::2, ::2] > 0) * 2
        middle = found.mean(axis=0) if len(found) else (np.array(self.labels.shape) - 1) / 2
        return {view: int(min(round(middle[axis]), self.size(view) - 1)) for view, axis in VIEW_AXES.items()}

    def window_for(self, preset: str) -> tuple[float, float]:
        """(level, width) of a preset; "Auto" from the body's 1st and 99th percentiles (the overview's MR window)."""
        fixed = WINDOW_PRESETS[preset]
        if fixed is not None:
            return fixed
        if self._auto_window is None:
            self._auto_window = body_percentile_window(self.image)
        return self._auto_window

    def render(
        self,
        view: str,
        index: int,
        window_level_width: tuple[float, float],
        visible: Collection[int] = (),
        alpha: float = DEFAULT_ALPHA,
    ) -> np.ndarray:
        """Slice `index` of `view` as RGB, with the labels in `visible` coloured in."""
        pixel_mm = float(min(self.spacing))
        grey = window(orthogonal_slice(self.image, self.spacing, view, index, pixel_mm), *window_level_width)
        labels = orthogonal_slice(self.labels, self.spacing, view, index, pixel_mm)
        rgb = blend_overlay(grey, labels, self.colours, alpha, visible=visible)
        factor = max(1, -(-MIN_DISPLAY_PIXELS // max(rgb.shape[:2])))
        return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1) if factor > 1 else rgb


def colour_hex(colours: np.ndarray, label: int) -> str:
    """`#rrggbb` of a label's overlay colour, for the legend."""
    r, g, b = (int(v) for v in colours[label])
    return f"#{r:02x}{g:02x}{b:02x}"
