"""TotalSegmentator's label-map postprocessing (postprocessing.py, libs.py), without scipy.

TotalSegmentator cleans its label maps with scipy.ndimage: connected components (`label`, the
default 6-connectivity cross), binary dilation/erosion with the default cross structure, and an
ellipsoid dilation for vertebrae. We reimplement those in numba so the runtime needs no scipy:

* Components are found with a raster-order union-find whose roots are the first voxel of each
  component in C order - the order in which scipy numbers them - so "largest blob" ties resolve
  to the same blob as upstream's argmax.
* Iterated cross dilation/erosion equals thresholding the city-block (L1) distance: dilating n
  times reaches every voxel within L1 distance n of the mask; eroding n times (outside the image
  counts as background, scipy's border_value=0) keeps voxels farther than n from any background.
  The exact L1 distance transform is separable (a forward and a backward pass per axis). scipy's
  iterations < 1 means "until nothing changes": a full image for a non-empty dilation, an empty
  one for erosion.
* Functions work on each label's bounding box only, which gives the same result (a component or
  a dilation of radius r lies within the box grown by r) and keeps 117-class maps fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numba
import numpy as np

#: Class names of the combinations `totalseg_combine_masks -m` offers (libs.combine_masks).
_RIBS = [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]
_VERTEBRAE = ["sacrum", "vertebrae_S1"] + [f"vertebrae_L{i}" for i in range(5, 0, -1)] + [
    f"vertebrae_T{i}" for i in range(12, 0, -1)
] + [f"vertebrae_C{i}" for i in range(7, 0, -1)]
COMBINE_MASK_CLASSES: dict[str, list[str]] = {
    "ribs": _RIBS,
    "vertebrae": _VERTEBRAE,
    "vertebrae_ribs": _VERTEBRAE + _RIBS,
    "lung": ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "lung_left": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "lung_right": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "pelvis": ["femur_left", "femur_right", "hip_left", "hip_right"],
    "body": ["body_trunc", "body_extremities"],
}

Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- connected components


@numba.njit(cache=True)
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


@numba.njit(cache=True)
def _union(parent, a, b):
    """Join two provisional labels; the smaller (earlier in raster order) becomes the root."""
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    if rb < ra:
        parent[ra] = rb
    return rb


@numba.njit(cache=True)
def _label_6(mask):
    """6-connected components of a boolean 3D array, numbered 1.. by first voxel in C order (like scipy).

    Returns (labels int32, sizes int64 indexed by label, sizes[0] = background count).
    """
    n0, n1, n2 = mask.shape
    labels = np.zeros((n0, n1, n2), dtype=np.int32)
    # A voxel opens a new provisional label only when none of its back-neighbours is foreground,
    # so those voxels are pairwise non-adjacent: at most ceil(size / 2) of them.
    parent = np.empty(mask.size // 2 + 2, dtype=np.int32)
    next_label = 1
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                if not mask[i, j, k]:
                    continue
                label = labels[i, j, k - 1] if k > 0 else 0
                if j > 0:
                    other = labels[i, j - 1, k]
                    if other > 0 and other != label:
                        label = other if label == 0 else _union(parent, label, other)
                if i > 0:
                    other = labels[i - 1, j, k]
                    if other > 0 and other != label:
                        label = other if label == 0 else _union(parent, label, other)
                if label == 0:
                    parent[next_label] = next_label
                    label = next_label
                    next_label += 1
                labels[i, j, k] = label
    final = np.zeros(next_label, dtype=np.int32)
    count = 0
    for provisional in range(1, next_label):
        root = _find(parent, provisional)
        if root == provisional:
            count += 1
            final[provisional] = count
        else:
            final[provisional] = final[root]
    sizes = np.zeros(count + 1, dtype=np.int64)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                label = final[labels[i, j, k]]
                labels[i, j, k] = label
                sizes[label] += 1
    return labels, sizes


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """`scipy.ndimage.label(mask)` (default cross structure) for 3D arrays: (int32 labels, count)."""
    labels, sizes = _label_6(np.ascontiguousarray(mask != 0))
    return labels, len(sizes) - 1


def keep_largest_blob(mask: np.ndarray) -> np.ndarray:
    """postprocessing.keep_largest_blob: the largest 6-connected component (first one on ties), uint8.

    An empty mask is returned as it is, like upstream.
    """
    labels, sizes = _label_6(np.ascontiguousarray(mask != 0))
    if len(sizes) <= 1:
        return mask
    return (labels == int(np.argmax(sizes[1:])) + 1).astype(np.uint8)


def remove_small_blobs(mask: np.ndarray, interval: Sequence[float] = (10, 30)) -> np.ndarray:
    """postprocessing.remove_small_blobs: keep components with interval[0] < size <= interval[1], uint8.

    (Upstream also tests the background's count against the interval; removing background changes
    nothing.) An empty mask is returned as it is.
    """
    labels, sizes = _label_6(np.ascontiguousarray(mask != 0))
    if len(sizes) <= 1:
        return mask
    sizes_f = sizes.astype(np.float64)
    keep = ~((sizes_f <= float(interval[0])) | (sizes_f > float(interval[1])))
    keep[0] = False
    return keep[labels].astype(np.uint8)


def blob_size_interval(size_threshold_mm3: float, zooms: Sequence[float]) -> list[float]:
    """[threshold in voxels, 1e10] as nnUNet_predict_image computes it: mm3 / prod(float32 header zooms).

    The product and the division happen in float32 (header zooms are float32, the mm3 a Python
    scalar), which can move a blob of exactly the threshold size across it.
    """
    voxel_volume = np.prod(np.asarray(zooms, dtype=np.float32))
    return [size_threshold_mm3 / voxel_volume, 1e10]


@numba.njit(cache=True)
def _label_boxes(data, max_label):
    """Per label value: [min0, max0, min1, max1, min2, max2] over its voxels (min > max when absent)."""
    boxes = np.empty((max_label + 1, 6), dtype=np.int64)
    for label in range(max_label + 1):
        for axis in range(3):
            boxes[label, 2 * axis] = data.shape[axis]
            boxes[label, 2 * axis + 1] = -1
    n0, n1, n2 = data.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                v = data[i, j, k]
                if v < 0 or v > max_label:
                    continue
                b = boxes[v]
                if i < b[0]:
                    b[0] = i
                if i > b[1]:
                    b[1] = i
                if j < b[2]:
                    b[2] = j
                if j > b[3]:
                    b[3] = j
                if k < b[4]:
                    b[4] = k
                if k > b[5]:
                    b[5] = k
    return boxes


def label_boxes(data: np.ndarray, labels: Iterable[int], grow: int = 0) -> dict[int, Box | None]:
    """Bounding box (as slices, grown by `grow` and clipped) of each label value; None when absent."""
    labels = [int(label) for label in labels]
    if not labels:
        return {}
    boxes = _label_boxes(np.ascontiguousarray(data), max(labels))
    result: dict[int, Box | None] = {}
    for label in labels:
        b = boxes[label]
        if b[1] < 0:
            result[label] = None
            continue
        result[label] = tuple(
            slice(max(0, int(b[2 * axis]) - grow), min(data.shape[axis], int(b[2 * axis + 1]) + 1 + grow)) for axis in range(3)
        )
    return result


def _roi_label_ids(class_map: Mapping[int, str], rois: Iterable[str]) -> list[int]:
    class_map_inv = {name: idx for idx, name in class_map.items()}
    return [class_map_inv[roi] for roi in rois]


def _clean_labels_in_place(data: np.ndarray, label_ids: Sequence[int], clean) -> np.ndarray:
    """Replace each label's voxels by `clean(label mask)` inside its bounding box, in label order.

    Cleaning only removes voxels of the label being cleaned, so the boxes found up front stay valid.
    """
    boxes = label_boxes(data, label_ids)
    for idx in label_ids:
        box = boxes[idx]
        if box is None:
            continue
        view = data[box]
        roi = view == idx
        cleaned = clean(roi) > 0.5
        view[roi] = 0
        view[cleaned] = idx
    return data


def keep_largest_blob_multilabel(data: np.ndarray, class_map: Mapping[int, str], rois: Iterable[str]) -> np.ndarray:
    """postprocessing.keep_largest_blob_multilabel: per roi name keep its largest blob; edits `data` in place."""
    return _clean_labels_in_place(data, _roi_label_ids(class_map, rois), keep_largest_blob)


def remove_small_blobs_multilabel(
    data: np.ndarray, class_map: Mapping[int, str], rois: Iterable[str], interval: Sequence[float] = (10, 30)
) -> np.ndarray:
    """postprocessing.remove_small_blobs_multilabel: per roi name drop blobs outside `interval`; in place."""
    return _clean_labels_in_place(data, _roi_label_ids(class_map, rois), lambda roi: remove_small_blobs(roi, interval))


# --------------------------------------------------------------------------- cross morphology


@numba.njit(parallel=True, cache=True)
def _l1_pass(distance, axis):
    """Forward and backward min(d, neighbour + 1) sweeps along one axis (exact L1 transform when done per axis)."""
    shape = distance.shape
    n = shape[axis]
    other_a = 1 if axis == 0 else 0
    other_b = 1 if axis == 2 else 2
    nb = shape[other_b]
    for flat in numba.prange(shape[other_a] * nb):
        a = flat // nb
        b = flat % nb
        for direction in range(2):
            previous = distance.dtype.type(0)
            for step in range(n):
                i = step if direction == 0 else n - 1 - step
                if axis == 0:
                    current = distance[i, a, b]
                elif axis == 1:
                    current = distance[a, i, b]
                else:
                    current = distance[a, b, i]
                if step > 0 and previous + 1 < current:
                    current = previous + 1
                    if axis == 0:
                        distance[i, a, b] = current
                    elif axis == 1:
                        distance[a, i, b] = current
                    else:
                        distance[a, b, i] = current
                previous = current


def _l1_distance_to(seeds: np.ndarray, cap: int) -> np.ndarray:
    """City-block distance of every voxel to the nearest seed, saturated at `cap`."""
    dtype = np.uint16 if cap < np.iinfo(np.uint16).max else np.int32
    distance = np.where(seeds, dtype(0), dtype(cap))
    for axis in range(3):
        _l1_pass(distance, axis)
    return distance


def binary_dilation_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """`scipy.ndimage.binary_dilation(mask, iterations=iterations)` (default cross structure), 3D."""
    seeds = mask != 0
    if iterations < 1:
        return np.full(mask.shape, bool(seeds.any()))
    if iterations == 1:  # six shifted ORs: far cheaper than the distance passes for one step (and small crops)
        grown = seeds.copy()
        for axis in range(3):
            low, high = [slice(None)] * 3, [slice(None)] * 3
            low[axis], high[axis] = slice(None, -1), slice(1, None)
            grown[tuple(high)] |= seeds[tuple(low)]
            grown[tuple(low)] |= seeds[tuple(high)]
        return grown
    reach = min(int(iterations), int(sum(mask.shape)))
    return _l1_distance_to(seeds, reach + 1) <= reach


def binary_erosion_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """`scipy.ndimage.binary_erosion(mask, iterations=iterations)` (cross, border_value=0), 3D."""
    if iterations < 1:
        return np.zeros(mask.shape, dtype=bool)
    background = np.pad(mask == 0, 1, constant_values=True)
    reach = min(int(iterations), int(sum(mask.shape)))
    distance = _l1_distance_to(background, reach + 1)
    return distance[1:-1, 1:-1, 1:-1] > reach


def remove_outside_of_mask(seg: np.ndarray, mask: np.ndarray, addon: int = 1) -> np.ndarray:
    """postprocessing.remove_outside_of_mask (array form): zero `seg` outside the mask dilated `addon` times; in place.

    Note upstream's scipy semantics: addon 0 dilates until nothing changes, i.e. keeps everything
    when the mask is not empty. TotalSegmentator computes addon as
    int(remove_outside_dilation_mm / mean(original header zooms)).
    """
    seg[~binary_dilation_cross(mask, iterations=addon)] = 0
    return seg


def remove_outside_dilation_voxels(dilation_mm: float, zooms: Sequence[float]) -> int:
    """int(dilation_mm / mean(zooms)) as nnUNet_predict_image converts it; the mean of float32 zooms is float32."""
    return int(dilation_mm / np.mean(np.asarray(zooms, dtype=np.float32)))


def extract_skin(ct: np.ndarray, body: np.ndarray) -> np.ndarray:
    """postprocessing.extract_skin: a 1-voxel-out / 3-voxels-in shell of the body at -200 < HU < 250, blobs > 5 voxels."""
    body = binary_dilation_cross(body, iterations=1).astype(np.uint8)
    body_inner = binary_erosion_cross(body, iterations=3).astype(np.uint8)
    skin = body - body_inner
    density_mask = (ct > -200) & (ct < 250)
    skin[~density_mask] = 0
    return remove_small_blobs(skin > 0.5, interval=[5, 1e10]).astype(np.uint8)


# --------------------------------------------------------------------------- label bookkeeping


def remove_auxiliary_labels(data: np.ndarray, auxiliary_label_ids: Iterable[int]) -> np.ndarray:
    """postprocessing.remove_auxiliary_labels: zero the task's `<task>_auxiliary` class ids, as uint8.

    Tasks without an auxiliary class map keep their label map unchanged (upstream returns the image as is).
    """
    auxiliary = list(auxiliary_label_ids)
    out = np.array(data, copy=True)
    out[np.isin(out, auxiliary)] = 0
    return out.astype(np.uint8)


def _label_lut(mapping: Mapping[int, int], max_value: int) -> np.ndarray:
    lut = np.zeros(max(max_value, max(mapping, default=0)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return lut


def reorder_multilabel_like_v1(data: np.ndarray, label_map_v2: Mapping[int, str], label_map_v1: Mapping[int, str]) -> np.ndarray:
    """libs.reorder_multilabel_like_v1: renumber a v2 'total' map to v1 ids (names absent in v2 stay empty), uint8."""
    label_map_v2_inv = {name: idx for idx, name in label_map_v2.items()}
    v2_to_v1: dict[int, int] = {}
    for v1_id, name in label_map_v1.items():
        if name in label_map_v2_inv:
            v2_to_v1[label_map_v2_inv[name]] = v1_id
    labels = np.asarray(data).astype(np.int64)
    if labels.size and labels.min() < 0:
        labels = np.where(labels < 0, 0, labels)
    return _label_lut(v2_to_v1, int(labels.max(initial=0)))[labels]


def keep_roi_subset(data: np.ndarray, label_ids: Iterable[int]) -> np.ndarray:
    """`img_data *= np.isin(img_data, list(label_map.keys()))`: zero every label not in `label_ids`; in place."""
    data *= np.isin(data, list(label_ids))
    return data


# --------------------------------------------------------------------------- combine masks


def combine_mask_names(class_type: str | Sequence[str]) -> list[str]:
    """Class names libs.combine_masks merges for `class_type` (a known combination or a list of names).

    Upstream's CLI also offers "heart", which combine_masks does not define (it then looks for
    files named after each letter); we refuse it instead.
    """
    if isinstance(class_type, str):
        if class_type not in COMBINE_MASK_CLASSES:
            raise ValueError(f"unknown mask combination {class_type!r}; known: {', '.join(COMBINE_MASK_CLASSES)}")
        return list(COMBINE_MASK_CLASSES[class_type])
    return list(class_type)


def combine_masks_from_labels(data: np.ndarray, label_map: Mapping[int, str], class_type: str | Sequence[str]) -> np.ndarray:
    """libs.combine_masks on a multilabel map: 1 where the label is one of the combination's classes, uint8."""
    label_map_inv = {name: idx for idx, name in label_map.items()}
    missing = [name for name in combine_mask_names(class_type) if name not in label_map_inv]
    if missing:
        raise KeyError(f"label map has no class {missing[0]!r}")
    target_ids = [label_map_inv[name] for name in combine_mask_names(class_type)]
    return np.isin(data, target_ids).astype(np.uint8)


def combine_masks_from_dir(mask_dir: Path, class_type: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """libs.combine_masks on a folder of binary `<class>.nii.gz` masks: (uint8 union of voxels > 0.5, affine of the first)."""
    import nibabel as nib

    names = combine_mask_names(class_type)
    for name in names:
        if not (mask_dir / f"{name}.nii.gz").exists():
            raise ValueError(f"Could not find {mask_dir / name}.nii.gz. Did you run TotalSegmentator successfully?")
    ref_img = nib.load(mask_dir / f"{names[0]}.nii.gz")
    combined = np.zeros(ref_img.shape, dtype=np.uint8)
    for name in names:
        combined[np.asanyarray(nib.load(mask_dir / f"{name}.nii.gz").dataobj) > 0.5] = 1
    return combined, ref_img.affine


# --------------------------------------------------------------------------- vertebrae_pp


def ellipsoid_structure(voxel_spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """postprocessing.get_ellipsoid_structuring_element: voxels of an ellipsoid of `radius_mm` on the voxel grid.

    The grid runs from -r to r + 1 (exclusive) in unit steps with r = radius_mm / spacing, so for
    a non-integer r it is not centred on 0; with float32 header spacings r is float32. Both shape
    the element exactly as upstream does.
    """
    if radius_mm <= 0:
        return np.ones((1, 1, 1), dtype=bool)
    radii = [radius_mm / spacing for spacing in voxel_spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    normalized = sum((grid * grid) / (r * r) for grid, r in zip(grids, radii))
    return normalized <= 1


@numba.njit(cache=True)
def _scatter_dilate(mask, offsets):
    """Binary dilation by a structure given as offsets (index - shape // 2): scipy's placement, border 0."""
    n0, n1, n2 = mask.shape
    out = np.zeros(mask.shape, dtype=np.bool_)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                if not mask[i, j, k]:
                    continue
                for o in range(offsets.shape[0]):
                    a = i + offsets[o, 0]
                    b = j + offsets[o, 1]
                    c = k + offsets[o, 2]
                    if 0 <= a < n0 and 0 <= b < n1 and 0 <= c < n2:
                        out[a, b, c] = True
    return out


def binary_dilation_structure(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_dilation(mask, structure=structure)` (one iteration, border 0), 3D."""
    offsets = np.argwhere(structure) - np.array(structure.shape) // 2
    return _scatter_dilate(np.ascontiguousarray(mask != 0), offsets.astype(np.int64))


@numba.njit(cache=True)
def _gather_erode(mask, offsets):
    """Binary erosion by a structure given as offsets (index - shape // 2): scipy's placement, border 0."""
    n0, n1, n2 = mask.shape
    out = np.zeros(mask.shape, dtype=np.bool_)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                keep = True
                for o in range(offsets.shape[0]):
                    a = i + offsets[o, 0]
                    b = j + offsets[o, 1]
                    c = k + offsets[o, 2]
                    if not (0 <= a < n0 and 0 <= b < n1 and 0 <= c < n2 and mask[a, b, c]):
                        keep = False
                        break
                out[i, j, k] = keep
    return out


def _mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a 3D mask's True voxels (None when empty)."""
    spans = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        spans.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(spans)  # type: ignore[return-value]


def binary_erosion_structure(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_erosion(mask, structure=structure)` (one iteration, border 0), 3D.

    Only the mask's bounding box is scanned: any offset leaving it meets background or the border.
    """
    mask = np.asarray(mask) != 0
    out = np.zeros(mask.shape, dtype=bool)
    box = _mask_box(mask)
    if box is None:
        return out
    offsets = (np.argwhere(structure) - np.array(structure.shape) // 2).astype(np.int64)
    out[box] = _gather_erode(np.ascontiguousarray(mask[box]), offsets)
    return out


def binary_erosion_box(mask: np.ndarray, radii: Sequence[int]) -> np.ndarray:
    """`skimage.morphology.binary_erosion(mask, np.ones(2 * radii + 1))`: a box erosion that ignores the image border.

    Voxels outside the image count as foreground (skimage's mode="ignore"), so a mask touching the
    border is not eaten from that side. Separable: one running-window test per axis over the mask's
    bounding box grown by the radii.
    """
    mask = np.asarray(mask) != 0
    out = np.zeros(mask.shape, dtype=bool)
    box = _mask_box(mask)
    if box is None:
        return out
    radii = [int(r) for r in radii]
    grown = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(box, radii, mask.shape))
    # pad to exactly box +- r: True beyond the image (ignored), the image's own voxels elsewhere
    pad = [(r - (s.start - g.start), r - (g.stop - s.stop)) for s, g, r in zip(box, grown, radii)]
    region = np.pad(mask[grown], pad, constant_values=True)
    for axis, r in enumerate(radii):
        holes = np.cumsum(~region, axis=axis, dtype=np.int32)
        holes = np.concatenate([np.zeros_like(np.take(holes, [0], axis=axis)), holes], axis=axis)
        n = region.shape[axis] - 2 * r
        window = np.take(holes, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis) - np.take(holes, np.arange(n), axis=axis)
        region = window == 0
    out[box] = region
    return out


@numba.njit(cache=True)
def _labels_touch(data):
    """Whether two different non-zero labels are 6-neighbours anywhere."""
    n0, n1, n2 = data.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                v = data[i, j, k]
                if v == 0:
                    continue
                if i + 1 < n0 and data[i + 1, j, k] != 0 and data[i + 1, j, k] != v:
                    return True
                if j + 1 < n1 and data[i, j + 1, k] != 0 and data[i, j + 1, k] != v:
                    return True
                if k + 1 < n2 and data[i, j, k + 1] != 0 and data[i, j, k + 1] != v:
                    return True
    return False


def dilate_vertebrae_labels(
    data: np.ndarray, label_map: Mapping[int, str], voxel_spacing: Sequence[float] = (1.0, 1.0, 1.0), dilation_mm: float = 3
) -> np.ndarray:
    """postprocessing.dilate_vertebrae_labels: grow each label (ascending id) by an ellipsoid into background only.

    Each label is dilated from `data` within its box grown by ceil(dilation_mm / spacing); earlier
    ids win contested voxels. Pass the float32 header zooms as `voxel_spacing`.
    """
    if dilation_mm <= 0:
        return data
    structure = ellipsoid_structure(voxel_spacing, dilation_mm)
    radius_vox = np.ceil([dilation_mm / spacing for spacing in voxel_spacing]).astype(int)
    out = data.copy()
    labels = sorted(label_map)
    boxes = label_boxes(data, labels)
    for label in labels:
        if boxes[label] is None:
            continue
        box = tuple(
            slice(max(b.start - int(r), 0), min(b.stop + int(r), n)) for b, r, n in zip(boxes[label], radius_vox, data.shape)
        )
        dilated = binary_dilation_structure(data[box] == label, structure)
        out_box = out[box]
        out_box[(out_box == 0) & dilated] = label
    return out


def postprocess_vertebrae_pp(
    data: np.ndarray,
    label_map: Mapping[int, str],
    min_size_mm3: float = 100,
    voxel_volume: float = 1.0,
    voxel_spacing: Sequence[float] = (1.0, 1.0, 1.0),
    dilation_mm: float = 3,
) -> np.ndarray:
    """postprocessing.postprocess_vertebrae_pp: relabel touching vertebrae by anatomy, then dilate (uint8).

    When no two labels touch, only the dilation runs. Otherwise 6-connected bodies of at least
    `min_size_mm3` (count * voxel_volume, voxel_volume = float32 product of the header zooms) are
    renumbered by their centre's third coordinate: from the bottom starting at the highest label
    present, or - when C1 but not L5 is present - from C1 downwards.
    """
    data = data.astype(np.uint8, copy=False)
    if not _labels_touch(np.ascontiguousarray(data)):
        return dilate_vertebrae_labels(data, label_map, voxel_spacing, dilation_mm)

    component_map, sizes = _label_6(np.ascontiguousarray(data > 0))
    keep_components = np.flatnonzero(sizes * voxel_volume >= min_size_mm3)
    keep_components = keep_components[keep_components != 0]
    if len(keep_components) == 0:
        return np.zeros_like(data, dtype=np.uint8)
    keep_lookup = np.zeros(sizes.shape, dtype=bool)
    keep_lookup[keep_components] = True
    keep_mask = keep_lookup[component_map]
    present_labels = sorted(int(label) for label in np.unique(data[keep_mask]) if int(label) in label_map)
    if len(present_labels) == 0:
        return np.zeros_like(data, dtype=np.uint8)

    label_map_inv = {name: idx for idx, name in label_map.items()}
    c1_label = label_map_inv["vertebrae_C1"]
    l5_label = label_map_inv["vertebrae_L5"]
    count_from_top = l5_label not in present_labels and c1_label in present_labels

    # Centre of mass along the third axis: integer coordinate sums are exact in float64, so one division matches scipy.
    z_sums = np.bincount(component_map.ravel(), weights=np.broadcast_to(np.arange(data.shape[2], dtype=np.float64), data.shape).ravel())
    component_centers = [(int(c), z_sums[c] / float(sizes[c])) for c in keep_components]
    if count_from_top:
        component_centers = sorted(component_centers, key=lambda item: item[1], reverse=True)
        labels_to_assign = range(c1_label, max(label_map) + 1)
    else:
        component_centers = sorted(component_centers, key=lambda item: item[1])
        labels_to_assign = range(max(present_labels), min(label_map) - 1, -1)

    lut = np.zeros(len(sizes), dtype=np.uint8)
    for (component, _), label in zip(component_centers, labels_to_assign):
        lut[component] = label
    out = lut[component_map]
    return dilate_vertebrae_labels(out, label_map, voxel_spacing, dilation_mm)


def refine_vertebrae_pp_with_body_mask(
    data: np.ndarray,
    body_data: np.ndarray,
    label_map: Mapping[int, str],
    voxel_spacing: Sequence[float] = (1.0, 1.0, 1.0),
    dilation_mm: float = 2,
) -> np.ndarray:
    """postprocessing.refine_vertebrae_pp_with_body_mask: dilate the instances, keep them where body_data == 1 (uint8).

    nnUNet_predict_image runs it on the final, original-resolution map with the *input file's*
    header zooms (img_in_orig.header.get_zooms()), not the rebuilt image's.
    """
    if data.shape != body_data.shape:
        raise ValueError(f"vertebrae_pp and vertebrae_body shapes do not match: {data.shape} vs {body_data.shape}")
    refined = dilate_vertebrae_labels(data, label_map, voxel_spacing, dilation_mm)
    refined[body_data != 1] = 0
    return refined.astype(np.uint8, copy=False)
