"""Vertebral body heights, as TotalSegmentator 2.18 measures them (spine_report/measure_verte_height.py).

Why heights: a vertebral compression fracture shows as one part of the body (usually the anterior)
lower than the rest, and osteoporosis as a low attenuation of its cancellous bone. Upstream's recipe,
step by step, on the closest-canonical (RAS) CT and the vertebrae_pp_refined label map:

    vertebrae in anatomical order C1..L5 (every class of the label table, present or not)
    ─► per vertebra: box erosion by round(3 mm / spacing) voxels (at least 1, the image border
       ignored) ─► centroid of what is left (of the raw mask when nothing is)
    ─► vertebrae touching the image border: centroid kept for the neighbours' axes, not measured
    ─► height axis = next centroid - previous centroid (voxel units; one side when a neighbour is
       missing; (0, 0, 1) with none); horizontal axis = its perpendicular in the sagittal plane (in mm)
    ─► body volume; mean and median CT of the body eroded by a 4 mm ellipsoid
    ─► sagittal slices every round(5 mm / x spacing) voxels over the middle half of the eroded body's
       left-right extent: on each, march from the centroid along the horizontal axis to both edges
       (0.5-voxel steps, bilinear "inside" test), then along the height axis from the points at 15,
       50 and 85 % of that line ("posterior", "middle", "anterior"); the slice whose three heights
       differ most wins (all three must be found); else the centroid's slice
    ─► height difference = 1 - shortest / longest height (rounded to whole percent)

The JSON keys and rounding are upstream's (`results_json`). Everything runs on arrays cropped to each
vertebra's bounding box, with the same numbers as upstream's whole-volume arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tsrt.totalseg import ops

#: Order of the spine's regions in upstream's sort (unknown letters after S, unparsable names last).
REGION_ORDER = {"C": 1, "T": 2, "L": 3, "S": 4}
#: (JSON name, fraction along the horizontal line from its first end); upstream names the positions
#: 15 %, 50 % and 85 % and maps them to these words.
POSITIONS = (("posterior", 0.15), ("middle", 0.5), ("anterior", 0.85))
STEP = 0.5  # voxels per step when marching to a mask edge
SCAN_MARGIN_RATIO = 0.25  # of the left-right extent, skipped at both sides when choosing the slice
SCAN_STEP_MM = 5.0
CENTROID_EROSION_MM = 3.0
INTENSITY_EROSION_MM = 4
#: Shortest / longest height below this marks a vertebra (yellow/orange) in upstream's pictures.
FRACTURE_RATIO = 0.8
LUMBAR = tuple(f"vertebrae_L{i}" for i in range(1, 6))
#: --spine_range: which vertebrae are reported (their neighbours still steer the axes).
SPINE_RANGES = {
    "all": None,
    "thoracic_lumbar": lambda name: name.startswith(("vertebrae_T", "vertebrae_L")),
    "lumbar": lambda name: name.startswith("vertebrae_L"),
    "l1_l4": lambda name: name in LUMBAR[:4],
}


@dataclass(frozen=True)
class Height:
    """One height line in the sagittal slice: `mm` (0 when no edge was found) from `start` to `end` (y, z voxels)."""

    mm: float
    point: tuple[float, float] | None = None
    start: tuple[float, float] | None = None
    end: tuple[float, float] | None = None

    @property
    def found(self) -> bool:
        return self.start is not None and self.end is not None


@dataclass
class Vertebra:
    """A measured vertebra: where it was measured and what."""

    name: str
    label: int
    centroid: np.ndarray  # voxel (x, y, z) on the canonical grid
    height_axis: np.ndarray
    x_slice: int
    heights: dict[str, Height]  # by POSITIONS name, in that order
    volume_mm3: float
    mean_hu: float
    median_hu: float
    #: The vertebra on its measured sagittal slice: mask and CT inside `box` (y, z slices of the slice).
    slice_box: tuple[slice, slice] = field(repr=False, default=(slice(0, 0), slice(0, 0)))
    slice_mask: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), bool))
    slice_ct: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def short_name(self) -> str:
        return self.name.replace("vertebrae_", "")

    def difference_percent(self) -> int:
        """Upstream's detect_potential_fracture: round(100 * (1 - shortest / longest)) over the heights found."""
        found = [h.mm for h in self.heights.values() if h.mm > 0]
        if len(found) < 2 or max(found) == 0:
            return 0
        return round((1 - min(found) / max(found)) * 100)

    def looks_fractured(self) -> bool:
        found = [h.mm for h in self.heights.values() if h.mm > 0]
        return len(found) >= 2 and min(found) / max(found) < FRACTURE_RATIO


@dataclass
class SpineHeights:
    vertebrae: list[Vertebra]
    spacing: tuple[float, float, float]  # the canonical grid's header zooms (mm)
    shape: tuple[int, int, int]


# --------------------------------------------------------------------------------------------- ordering


def vertebra_sort_key(name: str) -> tuple[int, int]:
    """(region, number) of `vertebrae_T12` and the like; names that do not parse sort last."""
    short = name.replace("vertebrae_", "").strip()
    if len(short) >= 2:
        try:
            return REGION_ORDER.get(short[0], 5), int(short[1:])
        except ValueError:
            pass
    return 99, 0


def select_vertebrae(label_map: Mapping[int, str], spine_range: str = "all") -> tuple[list[tuple[int, str]], set[str]]:
    """The vertebrae to process in anatomical order, and which of them only steer a neighbour's axis.

    A range keeps one vertebra beyond each end as such a helper, as upstream does.
    """
    ordered = sorted(
        ((int(label), name) for label, name in label_map.items() if name.startswith("vertebrae_")),
        key=lambda item: vertebra_sort_key(item[1]),
    )
    wanted = SPINE_RANGES.get(spine_range)
    if wanted is None:
        return ordered, set()
    inside = [i for i, (_, name) in enumerate(ordered) if wanted(name)]
    if not inside:
        return [], set()
    start, stop = max(0, inside[0] - 1), min(len(ordered) - 1, inside[-1] + 1)
    helpers = {ordered[i][1] for i in range(start, stop + 1) if i < inside[0] or i > inside[-1]}
    return ordered[start : stop + 1], helpers


# --------------------------------------------------------------------------------------------- lines


class SagittalSlice:
    """One sagittal slice of a vertebra mask, read at (y, z) voxel positions of the whole image.

    The mask is kept cropped to the vertebra; everything outside the crop is background, and the
    bounds and marching distance are those of the whole slice, as upstream sees them.
    """

    def __init__(self, crop: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> None:
        self.crop = np.asarray(crop, dtype=bool)
        self.origin = origin
        self.shape = shape

    def any(self) -> bool:
        return bool(self.crop.any())

    def value(self, y: int, z: int) -> bool:
        a, b = y - self.origin[0], z - self.origin[1]
        return 0 <= a < self.crop.shape[0] and 0 <= b < self.crop.shape[1] and bool(self.crop.item(a, b))

    def inside(self, y: float, z: float) -> bool:
        """Upstream's is_inside_mask: bilinear weights of the 4 neighbours summed (not normalised) > 0.5."""
        if not (0 <= y < self.shape[0] and 0 <= z < self.shape[1]):
            return False
        y_int, z_int = int(y), int(z)
        y_frac, z_frac = y - y_int, z - z_int
        value, count = 0.0, 0.0
        for dy in (0, 1):
            for dz in (0, 1):
                ny, nz = y_int + dy, z_int + dz
                if 0 <= ny < self.shape[0] and 0 <= nz < self.shape[1]:
                    weight = (1 - abs(dy - y_frac)) * (1 - abs(dz - z_frac))
                    value += self.value(ny, nz) * weight
                    count += weight
        return value > 0.5 if count > 0 else False


def _edge(mask: SagittalSlice, y: float, z: float, axis_y: float, axis_z: float, direction: int):
    """The last inside point marching from (y, z) along ±axis in STEP voxels (upstream's find_intersection)."""
    max_distance = max(mask.shape) * 1.5
    n_steps = math.ceil((max_distance - STEP) / STEP)
    for i in range(max(n_steps, 0)):
        step = STEP + i * STEP
        if not mask.inside(y + direction * axis_y * step, z + direction * axis_z * step):
            for j in range(4):  # back up in quarter steps (upstream's arange(step - STEP, step, STEP / 4))
                back = (step - STEP) + j * (STEP / 4)
                by, bz = y + direction * axis_y * back, z + direction * axis_z * back
                if mask.inside(by, bz):
                    return by, bz
            break
    return None


def axis_intersections(mask: SagittalSlice, y: float, z: float, axis_y: float, axis_z: float):
    """Where the line through (y, z) along (axis_y, axis_z) leaves the mask on either side; (None, None) if empty."""
    if not mask.any():
        return None, None
    length = math.sqrt(axis_y**2 + axis_z**2)
    if length == 0:
        return None, None
    axis_y, axis_z = axis_y / length, axis_z / length
    return _edge(mask, y, z, axis_y, axis_z, -1), _edge(mask, y, z, axis_y, axis_z, 1)


def measure_heights(
    mask: SagittalSlice, centre_y: float, centre_z: float, height_axis: np.ndarray, horizontal_2d: np.ndarray,
    spacing: Sequence[float],
) -> dict[str, Height]:
    """The three heights on one sagittal slice (upstream's measure_vertebra_heights)."""
    first, last = axis_intersections(mask, centre_y, centre_z, float(horizontal_2d[1]), float(horizontal_2d[2]))
    if first is None or last is None:
        return {name: Height(0) for name, _ in POSITIONS}
    heights = {}
    for name, fraction in POSITIONS:
        y = first[0] + fraction * (last[0] - first[0])
        z = first[1] + fraction * (last[1] - first[1])
        start, end = axis_intersections(mask, y, z, float(height_axis[1]), float(height_axis[2]))
        if start and end:
            dy_mm = (end[0] - start[0]) * float(spacing[1])
            dz_mm = (end[1] - start[1]) * float(spacing[2])
            heights[name] = Height(math.sqrt(dy_mm**2 + dz_mm**2), (y, z), start, end)
        else:
            heights[name] = Height(0, (y, z))
    return heights


# --------------------------------------------------------------------------------------------- axes


def height_axes(centroids: Sequence[np.ndarray | None], index: int) -> np.ndarray:
    """Unit height axis (voxel units) from the neighbours' centroids (upstream's _calculate_axes)."""
    previous = centroids[index - 1] if index > 0 else None
    following = centroids[index + 1] if index < len(centroids) - 1 else None
    current = centroids[index]
    if previous is not None and following is not None:
        axis = following - previous
    elif previous is not None:
        axis = current - previous
    elif following is not None:
        axis = following - current
    else:
        axis = np.array([0, 0, 1])
    return axis / np.linalg.norm(axis)


def sagittal_perpendicular(height_axis: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The in-slice direction perpendicular to the height axis in millimetres, back in voxel units."""
    sy, sz = float(spacing[1]), float(spacing[2])
    phys_y, phys_z = height_axis[1] * sy, height_axis[2] * sz
    return np.array([0, -phys_z / sy, phys_y / sz])


# --------------------------------------------------------------------------------------------- measuring


def _mean_index(indices: np.ndarray, offset: int) -> float:
    """np.mean of whole-image indices: integer sums are exact, so the crop offset goes in before dividing."""
    return float(np.mean(indices + offset))


def _centroid(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray | None:
    indices = np.nonzero(mask)
    if len(indices[0]) == 0:
        return None
    return np.array([_mean_index(idx, s.start) for idx, s in zip(indices, box)])


def _touches_border(box: tuple[slice, ...], shape: Sequence[int]) -> bool:
    return any(s.start == 0 or s.stop == n for s, n in zip(box, shape))


def measure_spine(
    ct: np.ndarray, labels: np.ndarray, label_map: Mapping[int, str], zooms: Sequence[float], spine_range: str = "all"
) -> SpineHeights:
    """Heights, volumes and intensities of every measurable vertebra.

    `ct` and `labels` are on one closest-canonical grid whose header zooms are `zooms` (float32, as
    nibabel reports them); `label_map` is the label file's whole table (absent vertebrae included:
    a missing neighbour leaves a gap in the axes, as upstream).
    """
    spacing = tuple(np.float32(z) for z in zooms[:3])
    shape = tuple(int(n) for n in labels.shape)
    selected, helpers = select_vertebrae(label_map, spine_range)
    boxes = ops.label_boxes(labels, [label for label, _ in selected])
    erosion = [max(1, int(round(CENTROID_EROSION_MM / float(s)))) for s in spacing]

    centroids: list[np.ndarray | None] = []
    measurable: list[tuple[int, int, str, tuple[slice, ...], np.ndarray, np.ndarray]] = []
    for index, (label, name) in enumerate(selected):
        box = boxes[label]
        if box is None:
            centroids.append(None)
            continue
        grown = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(box, erosion, shape))
        region = labels[grown] == label
        smoothed = ops.binary_erosion_box(region, erosion)
        inner = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown))
        mask, smoothed = region[inner], smoothed[inner]
        centroid = _centroid(smoothed, box)
        if centroid is None:
            centroid = _centroid(mask, box)
        centroids.append(centroid)
        if name in helpers or name == "vertebrae_S1" or _touches_border(box, shape):
            continue
        measurable.append((index, label, name, box, mask, smoothed))

    voxel_mm3 = float(spacing[0] * spacing[1] * spacing[2])
    structure = ops.ellipsoid_structure(spacing, INTENSITY_EROSION_MM)
    step = max(1, int(round(np.float32(SCAN_STEP_MM) / spacing[0])))
    vertebrae = []
    for index, label, name, box, mask, smoothed in measurable:
        height_axis = height_axes(centroids, index)
        horizontal = sagittal_perpendicular(height_axis, spacing)
        centroid = centroids[index]
        eroded = ops.binary_erosion_structure(mask, structure)
        if eroded.any():
            values = np.asarray(ct[box], dtype=np.float64)[eroded]
            mean_hu, median_hu = float(np.mean(values)), float(np.median(values))
        else:
            mean_hu = median_hu = 0.0

        def slice_at(x: int) -> SagittalSlice:
            local = x - box[0].start
            crop = mask[local] if 0 <= local < mask.shape[0] else np.zeros((0, 0), bool)
            return SagittalSlice(crop, (box[1].start, box[2].start), shape[1:])

        best_x, best, best_spread = None, None, -1.0
        present = np.flatnonzero(smoothed.any(axis=(1, 2))) + box[0].start
        if present.size:
            x_min, x_max = int(present[0]), int(present[-1])
            margin = int(round(SCAN_MARGIN_RATIO * (x_max - x_min + 1)))
            start = min(shape[0] - 1, max(0, x_min + margin))
            stop = min(shape[0] - 1, max(0, x_max - margin))
            for x in range(start, stop + 1, step):
                heights = measure_heights(slice_at(x), centroid[1], centroid[2], height_axis, horizontal, spacing)
                values_mm = [h.mm for h in heights.values()]
                if all(v > 0 for v in values_mm) and max(values_mm) - min(values_mm) > best_spread:
                    best_x, best, best_spread = x, heights, max(values_mm) - min(values_mm)
        if best_x is None:
            best_x = max(0, min(int(round(centroid[0])), shape[0] - 1))
            best = measure_heights(slice_at(best_x), centroid[1], centroid[2], height_axis, horizontal, spacing)
        local = best_x - box[0].start
        vertebrae.append(Vertebra(
            name=name, label=label, centroid=centroid, height_axis=height_axis, x_slice=best_x, heights=best,
            volume_mm3=float(np.count_nonzero(mask)) * voxel_mm3, mean_hu=mean_hu, median_hu=median_hu,
            slice_box=(box[1], box[2]), slice_mask=mask[local].copy(),
            slice_ct=np.asarray(ct[best_x, box[1], box[2]], dtype=np.float64),
        ))
    return SpineHeights(vertebrae, tuple(float(s) for s in spacing), shape)


# --------------------------------------------------------------------------------------------- JSON


def results_json(vertebrae: Sequence[Vertebra]) -> dict[str, float | int | None]:
    """Upstream's spine_report_heights.json: keys, order and rounding of save_results."""
    results: dict[str, float | int | None] = {}
    lumbar = []
    for vertebra in vertebrae:
        name = vertebra.name
        for position, height in vertebra.heights.items():
            # upstream rounds a float64 height with numpy's round, and keeps the integer 0 of a missing one
            results[f"{name}_height_{position}_mm"] = float(np.round(np.float64(height.mm), 2)) if height.found else 0
        difference = vertebra.difference_percent() / 100.0
        results[f"{name}_height_difference"] = round(difference, 3)
        if name in LUMBAR:
            lumbar.append(difference)
        results[f"{name}_volume_ml"] = round(vertebra.volume_mm3 / 1000.0, 2)
        results[f"{name}_intensity"] = round(vertebra.mean_hu, 2)
        results[f"{name}_intensity_median"] = round(vertebra.median_hu, 2)
    results["LWS_max"] = round(max(lumbar), 3) if lumbar else None
    return results
