"""Cross-section geometry of TotalSegmentator's vessel reports, without scipy, scikit-image or scikit-learn.

TotalSegmentator 2.18 measures a vessel where a plane cuts it (pulmonary_report/measurements.py, on
top of aorta_report/geometry.py and geometry_report.py): the plane through a landmark's centre,
normal to the landmark's flattest direction, is intersected with the vessel mask, the cut is rotated
so that it lies in one axial slice, and on that slice the widest span of the cut's border and the
widest span across it give the diameters. Upstream uses nibabel's `resample_from_to`
(scipy.ndimage.affine_transform), scikit-image's labels, scikit-learn's PCA and scipy's pdist; this
module does the same arithmetic with numpy, numba and SimpleITK (tsrt's runtime dependencies):

* `affine_transform` is scipy's for mode 'constant': the spline prefilter with mirror boundaries,
  input coordinates ``shift + i*m0 + j*m1 + k*m2`` (summed in that order), points outside [0, n-1] get `cval`, taps past
  an edge are mirrored, the taps summed in C order, integer outputs rounded half away from zero.
* `mask_normal` is `PCA(...).components_[-1]` as scikit-learn computes it for such point clouds
  (covariance eigenvectors for >= 30 points, an SVD below), so planes are drawn with the same normal.
* Components with full connectivity come from SimpleITK, renumbered by their first voxel in C order,
  which is how scikit-image numbers them; a blob's "first region" is then the same blob.
* Farthest pairs compare exact integer squared distances, so ties resolve to the pair pdist's argmax
  picks (the first in (i, j) order).

The functions are not specific to the pulmonary artery: the aorta report (tsrt.reports.aorta_geometry)
cuts, measures and turns the aorta with them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np

from tsrt.totalseg import ops

#: Poles of the B-spline prefilters (scipy ni_splines.c get_filter_poles), per spline order.
_SPLINE_POLES: dict[int, tuple[float, ...]] = {
    2: (-0.171572875253809902396622551580603843,),
    3: (-0.267949192431122706472553658494127633,),
}


# --------------------------------------------------------------------------------------------- resampling


@numba.njit(cache=True)
def _mirror_filter_lines(lines: np.ndarray, poles: np.ndarray, gain: float) -> None:
    """scipy's apply_filter with mirror-initialised passes (its modes 'mirror', 'constant', 'nearest') per row."""
    n = lines.shape[1]
    for row in range(lines.shape[0]):
        c = lines[row]
        for i in range(n):
            c[i] *= gain
        for z in poles:
            z_i = z
            z_n_1 = math.pow(z, float(n - 1))
            c[0] = c[0] + z_n_1 * c[n - 1]
            for i in range(1, n - 1):
                c[0] += z_i * (c[i] + z_n_1 * c[n - 1 - i])
                z_i *= z
            c[0] /= 1 - z_n_1 * z_n_1
            for i in range(1, n):
                c[i] += z * c[i - 1]
            c[n - 1] = (z * c[n - 2] + c[n - 1]) * z / (z * z - 1)
            for i in range(n - 2, -1, -1):
                c[i] = z * (c[i + 1] - c[i])


def _spline_coefficients(data: np.ndarray, order: int) -> np.ndarray:
    """`scipy.ndimage.spline_filter(data, order, output=float64, mode='constant')`: each axis in turn."""
    poles = np.array(_SPLINE_POLES[order], dtype=np.float64)
    gain = 1.0
    for z in poles:
        gain *= (1.0 - z) * (1.0 - 1.0 / z)
    coefficients = np.array(data, dtype=np.float64)
    for axis in range(coefficients.ndim):
        if coefficients.shape[axis] <= 1:
            continue
        moved = np.ascontiguousarray(np.moveaxis(coefficients, axis, -1))
        _mirror_filter_lines(moved.reshape(-1, moved.shape[-1]), poles, gain)
        coefficients = np.moveaxis(moved, -1, axis)
    return np.ascontiguousarray(coefficients)


@numba.njit(cache=True)
def _mirror_index(index: int, length: int) -> int:
    """A filter tap past the edge, mirrored about the edge voxel (scipy's edge_offsets)."""
    if length <= 1:
        return 0
    period = 2 * length - 2
    if index < 0:
        index = period * (-index // period) + index
        index = index + period if index <= 1 - length else -index
    elif index >= length:
        index -= period * (index // period)
        if index >= length:
            index = period - index
    return index


@numba.njit(cache=True)
def _tap_weights(c: float, order: int, out: np.ndarray) -> None:
    """scipy's get_spline_interpolation_weights for orders 1 and 3 (the last weight is 1 minus the others)."""
    x = c - math.floor(c)
    if order == 1:
        out[0] = 1.0 - x
    else:
        z = 1.0 - x
        out[1] = (x * x * (x - 2.0) * 3.0 + 4.0) / 6.0
        out[2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        out[0] = z * z * z / 6.0
    last = 1.0
    for i in range(order):
        last -= out[i]
    out[order] = last


@numba.njit(parallel=True, cache=True)
def _affine_kernel(source, matrix, shift, out, order, cval):
    """Interpolate `source` at matrix @ (i, j, k) + shift for every output voxel (float64 results)."""
    n0, n1, n2 = out.shape
    taps = order + 1
    for i in numba.prange(n0):
        index = np.zeros((3, taps), dtype=np.int64)
        weights = np.ones((3, taps), dtype=np.float64)
        for j in range(n1):
            for k in range(n2):
                inside = True
                for h in range(3):
                    c = shift[h]
                    c += i * matrix[h, 0]
                    c += j * matrix[h, 1]
                    c += k * matrix[h, 2]
                    length = source.shape[h]
                    if c < 0 or c > length - 1:
                        inside = False
                        break
                    start = int(math.floor(c)) if order & 1 else int(math.floor(c + 0.5))
                    start -= order // 2
                    for t in range(taps):
                        index[h, t] = _mirror_index(start + t, length)
                    if order > 0:
                        _tap_weights(c, order, weights[h])
                if not inside:
                    out[i, j, k] = cval
                    continue
                total = 0.0
                for a in range(taps):
                    for b in range(taps):
                        for d in range(taps):
                            value = np.float64(source[index[0, a], index[1, b], index[2, d]])
                            if order > 0:
                                value *= weights[0, a]
                                value *= weights[1, b]
                                value *= weights[2, d]
                            total += value
                out[i, j, k] = total
    return out


def affine_transform(
    data: np.ndarray, matrix: np.ndarray, offset: np.ndarray, output_shape: Sequence[int], order: int, cval: float = 0.0
) -> np.ndarray:
    """`scipy.ndimage.affine_transform(data, matrix, offset, output_shape, order=order, mode='constant')` for 3D.

    The result has the input's dtype, like scipy's default output (integers rounded half away from zero).
    """
    if order not in (0, 1, 3):
        raise ValueError(f"spline order must be 0, 1 or 3, got {order}")
    source = data.view(np.uint8) if data.dtype == np.bool_ else np.ascontiguousarray(data)
    if order > 1:
        source = _spline_coefficients(source, order)
    values = _affine_kernel(
        source, np.ascontiguousarray(matrix, dtype=np.float64), np.ascontiguousarray(offset, dtype=np.float64),
        np.empty(tuple(int(n) for n in output_shape), dtype=np.float64), order, float(cval),
    )
    kind = data.dtype.kind
    if kind == "i":
        info = np.iinfo(data.dtype)
        values = np.clip(np.where(values > 0, values + 0.5, values - 0.5), info.min, info.max)
    elif kind == "u":
        info = np.iinfo(data.dtype)
        values = np.clip(np.where(values > 0, values + 0.5, 0.0), 0, info.max)
    return values.astype(data.dtype)


def resample_from_to(
    data: np.ndarray, from_affine: np.ndarray, to_shape: Sequence[int], to_affine: np.ndarray, order: int
) -> np.ndarray:
    """nibabel.processing.resample_from_to(image, (to_shape, to_affine), order) on arrays (mode 'constant', 0)."""
    to_vox_to_from_vox = np.linalg.inv(np.asarray(from_affine, dtype=np.float64)).dot(np.asarray(to_affine))
    return affine_transform(data, to_vox_to_from_vox[:3, :3], to_vox_to_from_vox[:3, 3], to_shape, order)


# --------------------------------------------------------------------------------------------- morphology


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` (default cross connectivity) of a 2D or 3D mask, as uint8."""
    from tsrt.pipeline.preprocess import fill_holes_3d

    mask = np.asarray(mask) != 0
    if mask.ndim == 3:
        return fill_holes_3d(mask).astype(np.uint8)
    # 2D: between two full slices the middle one only reaches the border within its own plane.
    stacked = np.stack([np.ones_like(mask), mask, np.ones_like(mask)], axis=2)
    return fill_holes_3d(stacked)[:, :, 1].astype(np.uint8)


def erode(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_erosion(mask)` (cross structure, outside counts as background) in 2D or 3D."""
    mask = np.asarray(mask) != 0
    if mask.ndim == 3:
        return ops.binary_erosion_cross(mask)
    # 2D: repeated above and below, the middle slice's z-neighbours are itself.
    return ops.binary_erosion_cross(np.repeat(mask[:, :, None], 3, axis=2))[:, :, 1]


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask that touch its outside: mask XOR its erosion."""
    mask = np.asarray(mask) != 0
    return mask & ~erode(mask)


def label_full(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Components with full connectivity (8 in 2D, 26 in 3D), numbered by first voxel in C order (scikit-image's)."""
    import SimpleITK as sitk

    foreground = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(foreground), True))
    values, first = np.unique(labels.ravel(), return_index=True)
    present = values != 0
    values, first = values[present], first[present]
    renumber = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    renumber[values[np.argsort(first)]] = np.arange(1, len(values) + 1, dtype=np.int32)
    return renumber[labels], len(values)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding the mask's voxels (C order inside it is C order outside), None when empty."""
    present = np.argwhere(mask)
    if not len(present):
        return None
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(present.min(axis=0), present.max(axis=0)))


def keep_closest_blob(mask: np.ndarray, point: Sequence[float]) -> np.ndarray:
    """The 26-connected blob whose voxels are nearest to `point` on average (uint8); an empty mask as it is."""
    box = _bounding_box(mask)
    if box is None:
        return mask
    labels, count = label_full(mask[box])
    coordinates = np.argwhere(labels > 0)
    blob = labels[tuple(coordinates.T)]
    distances = np.linalg.norm(coordinates + np.array([b.start for b in box]) - np.asarray(point), axis=1)
    mean = np.bincount(blob, weights=distances, minlength=count + 1)[1:] / np.bincount(blob, minlength=count + 1)[1:]
    closest = np.zeros(mask.shape, dtype=np.uint8)
    closest[box] = labels == int(np.argmin(mean)) + 1
    return closest


# --------------------------------------------------------------------------------------------- planes


def find_center(mask: np.ndarray, integer: bool = False) -> np.ndarray | None:
    """Mean voxel index of the mask (rounded half to even when `integer`), None for an empty mask."""
    points = np.argwhere(mask)
    if not len(points):
        return None
    centre = points.mean(axis=0)
    return np.round(centre).astype(np.int32) if integer else centre


def mask_normal(mask: np.ndarray) -> np.ndarray:
    """Unit normal of a flat mask: its least-variance direction, as upstream's scikit-learn PCA finds it.

    scikit-learn picks the covariance eigen-solver for >= 10 samples per feature (30 points) and a full
    SVD below; the components' signs make each one's largest entry positive.
    """
    points = np.argwhere(np.asarray(mask) > 0.5)
    if not points.size:
        raise ValueError("mask_normal: the mask has no voxels")
    if len(points) == 1:
        return np.array([0.0, 0.0, 1.0])
    centred = points - points.mean(axis=0)
    mean = np.mean(centred, axis=0)
    count = len(centred)
    if count >= 30:
        covariance = centred.T @ centred
        covariance -= count * mean.reshape(-1, 1) * mean.reshape(1, -1)
        covariance /= count - 1
        _, vectors = np.linalg.eigh(covariance)
        rows = np.flip(vectors, axis=1).T
    else:
        _, _, rows = np.linalg.svd(centred - mean, full_matrices=False)
    rows = rows * np.sign(rows[np.arange(len(rows)), np.argmax(np.abs(rows), axis=1)])[:, None]
    normal = np.asarray(rows[min(3, count) - 1], dtype=float)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-10 else np.array([0.0, 0.0, 1.0])


def draw_plane(shape: Sequence[int], normal: Sequence[float], point: Sequence[float]) -> np.ndarray:
    """Voxels closer than one voxel to the plane through `point` with `normal` (uint8)."""
    normal = np.asarray(normal, dtype=float)
    norm = np.linalg.norm(normal)
    if norm == 0:
        return np.zeros(tuple(shape), dtype=np.uint8)
    normal = normal / norm
    point = np.asarray(point, dtype=float)
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    distance = sum((grid[axis] - point[axis]) * normal[axis] for axis in range(len(shape)))
    return (np.abs(distance) < 1).astype(np.uint8)


def plane_intersection(vessel: np.ndarray, point: Sequence[float], normal: Sequence[float]) -> np.ndarray:
    """The vessel's cross-section with the plane: plane AND vessel, grown by one voxel, the blob nearest `point`."""
    cut = (draw_plane(vessel.shape, normal, point) + vessel) > 1
    return keep_closest_blob(ops.binary_dilation_cross(cut), point)


# --------------------------------------------------------------------------------------------- diameters


def farthest_pair(points: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The two integer points farthest apart (the first such pair in (i, j) order, as pdist's argmax)."""
    if len(points) == 0:
        return 0.0, None, None
    if len(points) == 1:
        return 0.0, points[0].copy(), points[0].copy()
    points = np.asarray(points, dtype=np.int64)
    best, pair = -1, (0, 1)
    block = max(1, 2_000_000 // len(points))
    for first in range(0, len(points) - 1, block):
        rows = points[first : first + block]
        squared = ((rows[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
        squared[np.arange(len(rows))[:, None] + first >= np.arange(len(points))[None, :]] = -1  # only j > i
        top = int(squared.max())
        if top > best:
            best = top
            i, j = np.unravel_index(int(np.argmax(squared)), squared.shape)
            pair = (first + int(i), int(j))
    return math.sqrt(best), points[pair[0]].copy(), points[pair[1]].copy()


def region_diameter(
    mask: np.ndarray, farthest: Callable[[np.ndarray], tuple] = farthest_pair
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """The widest span of the border of the mask's first blob (full connectivity): (length, start, end) in voxels.

    Upstream's `next(get_region_diameters(mask))`: the blob is taken alone in its bounding box, its
    border is blob minus its erosion (so a blob at the box's edge keeps that face). `farthest` finds
    the span among the border voxels (`farthest_pair`, or one that gives the same pair faster).
    """
    outer = _bounding_box(mask)
    if outer is None:
        return None
    blob = label_full(mask[outer])[0] == 1
    inner = _bounding_box(blob)
    low = np.array([a.start + b.start for a, b in zip(outer, inner)])
    length, start, end = farthest(np.argwhere(boundary(blob[inner])))
    return length, start + low, end + low


def perpendicular_line(mask: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The longest chord of the mask's border at nearly right angles to start-end (|cos| < 0.1, else 0.2, 0.5).

    At |cos| < 0.1 a chord must be longer than 5 voxels to count; none at all gives (0, None, None).
    """
    points = np.transpose(np.where(boundary(mask)))
    if len(points) < 2:
        return 0.0, None, None
    first, second = np.triu_indices(len(points), 1)
    vectors = points[second] - points[first]
    lengths = np.linalg.norm(vectors, axis=1)
    reference = np.asarray(end) - np.asarray(start)
    cosines = np.abs(vectors @ reference) / (lengths * np.linalg.norm(reference) + 1e-7)
    for threshold in (0.1, 0.2, 0.5):
        eligible = np.flatnonzero(cosines < threshold)
        if len(eligible):
            best = eligible[int(np.argmax(lengths[eligible]))]
            if threshold != 0.1 or lengths[best] > 5:
                return float(lengths[best]), points[first[best]], points[second[best]]
    return 0.0, None, None


def distance_mm(a: Sequence[float], b: Sequence[float], spacing: Sequence[float]) -> float:
    """Euclidean distance of two voxel positions in mm (upstream's get_distance)."""
    return float(np.sqrt(np.sum(((np.asarray(a) - np.asarray(b)) * np.asarray(spacing)) ** 2)))


@dataclass(frozen=True)
class SliceDiameters:
    """A cross-section's widest span and the widest span across it, in mm, with their end points (voxels)."""

    diameter_mm: float
    perpendicular_mm: float
    start: np.ndarray
    end: np.ndarray
    start_perpendicular: np.ndarray
    end_perpendicular: np.ndarray


def slice_diameters(mask: np.ndarray, spacing: Sequence[float]) -> SliceDiameters | None:
    """Both diameters of a 2D cross-section (upstream's get_region_diameters_pd); None below 5 pixels or
    when no chord crosses the widest span."""
    if mask.sum() < 5:
        return None
    widest = region_diameter(mask)
    if widest is None:
        return None
    _, start, end = widest
    _, start_pd, end_pd = perpendicular_line(mask, start, end)
    if start_pd is None or end_pd is None:
        return None
    return SliceDiameters(
        distance_mm(start, end, spacing), distance_mm(start_pd, end_pd, spacing), start, end, start_pd, end_pd
    )


# --------------------------------------------------------------------------------------------- rotation


def rotation_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation turning direction `source` onto `target` (Rodrigues; a half turn when they are opposite)."""

    def unit(vector: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(vector)
        return vector if norm == 0 else vector / norm

    source, target = unit(source), unit(target)
    if not np.linalg.norm(source) or not np.linalg.norm(target):
        return np.eye(3)
    dot = np.clip(np.dot(source, target), -1.0, 1.0)
    if np.isclose(dot, 1):
        return np.eye(3)
    if np.isclose(dot, -1):
        axis = unit(np.cross(source, np.eye(3)[np.argmin(np.abs(source))]))
        return 2 * np.outer(axis, axis) - np.eye(3)
    cross = np.cross(source, target)
    skew = np.array([[0, -cross[2], cross[1]], [cross[2], 0, -cross[0]], [-cross[1], cross[0], 0]])
    return np.eye(3) + skew + skew @ skew * (1 - dot) / np.linalg.norm(cross) ** 2


def box_around(centre: Sequence[float], radius: Sequence[int], shape: Sequence[int]) -> list[list[int]]:
    """[[lo, hi)] per axis, `radius` voxels either side of `centre` (truncated), clipped to the image."""
    return [[max(0, int(centre[a] - radius[a])), min(shape[a], int(centre[a] + radius[a]))] for a in range(3)]


def fixed_size_box(mask: np.ndarray, zooms: Sequence[float], size_mm: Sequence[float]) -> list[list[int]]:
    """A box of `size_mm` around the mean voxel of mask > 0.5 (the image centre if there is none), clipped.

    Upstream's crop_to_masks(..., fixed_size=True): half sizes in voxels are int(int(size / zoom) / 2).
    """
    half = ((np.asarray(size_mm) / np.asarray(zooms)[:3]).astype(int) / 2).astype(int)
    coordinates = np.where(np.asarray(mask) > 0.5)
    if len(coordinates[0]):
        centre = [int(np.mean(coordinates[axis])) for axis in range(3)]
    else:
        centre = [n // 2 for n in mask.shape]
    return box_around(centre, half, mask.shape)


def crop_around_mask(
    data: np.ndarray, affine: np.ndarray, mask: np.ndarray, size_mm: Sequence[float], dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """A box of `size_mm` around the mask's mean voxel (clipped to the image), cast to `dtype`."""
    return ops.crop_to_bbox(data, affine, fixed_size_box(mask, ops.nifti_zooms(affine), size_mm), dtype)


def turn_onto_z(
    plane: np.ndarray, affine: np.ndarray, normal_of: Callable[[np.ndarray], np.ndarray] = mask_normal
) -> np.ndarray:
    """The world transform (4x4) turning a cut's normal onto its grid's z axis, about the cut's centre in mm.

    Upstream's get_2d_plane (rotate_affine_of_image_and_translate): the normal (`normal_of` the cut, in
    voxels) and the grid's z axis go to mm, the z axis flips to the normal's side, and the rotation
    between them is applied about the centre. An empty cut turns about the grid's centre, by nothing.
    """
    centre_voxel = find_center(plane)
    if centre_voxel is None:
        centre_voxel = (np.asarray(plane.shape) - 1) / 2
        normal_voxel = np.array([0.0, 0.0, 1.0])
    else:
        normal_voxel = normal_of(plane)
    linear = affine[:3, :3]
    centre = linear @ centre_voxel + affine[:3, 3]
    normal = linear @ normal_voxel
    target = linear @ np.array([0, 0, 1])
    if np.dot(normal, target) < 0:
        target = -target
    rotation = np.eye(4)
    rotation[:3, :3] = rotation_matrix(normal, target)
    to_origin, back = np.eye(4), np.eye(4)
    to_origin[:3, 3] -= centre
    back[:3, 3] += centre
    return back @ rotation @ to_origin


@dataclass
class PlaneSlab:
    """A cross-section rotated into the axial plane of a crop around it (upstream's get_2d_plane)."""

    plane: np.ndarray  # the cross-section, float64 0/1, on the crop grid
    ct: np.ndarray  # the CT on the same rotated grid (cubic), float64
    affine: np.ndarray  # the crop grid's voxel -> mm
    to_world: np.ndarray  # rotated-grid voxel -> mm of the original image (upstream's inverse_affine)


def rotate_into_axial(plane: np.ndarray, ct: np.ndarray, affine: np.ndarray, size_mm: float) -> PlaneSlab:
    """Crop a `size_mm` box around the cut, turn the cut's normal onto the box's z axis and resample both.

    The rotation is about the cut's centre in mm; the cut is resampled nearest-neighbour, the CT (cast
    to int32 first, as upstream crops it) with cubic splines.
    """
    size = [size_mm] * 3
    plane_crop, crop_affine = crop_around_mask(plane, affine, plane, size, np.uint8)
    ct_crop, _ = crop_around_mask(ct, affine, plane, size, np.int32)
    plane_values = plane_crop.astype(np.float64)
    combined = turn_onto_z(plane_values, crop_affine)
    rotated_affine = combined @ crop_affine
    shape = plane_values.shape
    return PlaneSlab(
        plane=resample_from_to(plane_values, rotated_affine, shape, crop_affine, 0),
        ct=resample_from_to(ct_crop.astype(np.float64), rotated_affine, shape, crop_affine, 3),
        affine=crop_affine,
        to_world=np.linalg.inv(combined) @ crop_affine,
    )
