"""Cross-sections of the aorta: planes through the mask, their blobs and their diameters.

The aorta report measures a landmark by cutting the mask with the plane normal to the centerline
(a slab two voxels thick, grown by one voxel), keeping the cut's blob nearest to the centerline
point, turning that cut into the z-plane and measuring the longest chord between boundary pixels
(the diameter) and the longest chord roughly perpendicular to it. These are TotalSegmentator's
aorta_report/geometry*.py steps; they run on scipy, scikit-image and nibabel as upstream does, so
the same voxels go into every measurement (numpy/numba reimplementations would have to match
scipy's label order, its spline resampling and skimage's region order voxel for voxel).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tsrt.errors import require_module
from tsrt.totalseg import ops

FEATURE = "The aorta report"
EXTRA = "reports"


def require_scientific() -> None:
    """scipy and scikit-image (the `reports` extra), or one line saying how to install them."""
    require_module("scipy", FEATURE, EXTRA)
    require_module("skimage", FEATURE, EXTRA, called="scikit-image")


def center_of(mask: np.ndarray, integer: bool = False) -> np.ndarray | None:
    """Mean voxel position of a mask (rounded to int32 when `integer`), None when it is empty."""
    points = np.argwhere(mask)
    if not len(points):
        return None
    center = points.mean(axis=0)
    return np.round(center).astype(np.int32) if integer else center


def plane_slab(shape: Sequence[int], normal, point) -> np.ndarray:
    """Voxels closer than one voxel to the plane through `point` with `normal` (uint8; empty for a zero normal)."""
    normal = np.asarray(normal, dtype=float)
    norm = np.linalg.norm(normal)
    if norm == 0:
        return np.zeros(shape, dtype=np.uint8)
    normal = normal / norm
    point = np.asarray(point, dtype=float)
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    distance = sum((grid[axis] - point[axis]) * normal[axis] for axis in range(len(shape)))
    return (np.abs(distance) < 1).astype(np.uint8)


def keep_closest_blob(mask: np.ndarray, reference) -> np.ndarray:
    """The 26-connected blob whose voxels lie closest (on average) to `reference`; `mask` itself if it is empty."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return mask
    best, best_distance = 0, None
    for blob in range(1, count + 1):
        distance = np.linalg.norm(np.asarray(np.where(labels == blob)).T - reference, axis=1).mean()
        if best_distance is None or distance < best_distance:
            best, best_distance = blob, distance
    return (labels == best).astype(np.uint8)


def cross_section(mask: np.ndarray, point, normal) -> np.ndarray:
    """The aorta's cut by the plane at `point`: slab ∩ mask, grown by one voxel, blob nearest to `point`."""
    cut = (plane_slab(mask.shape, normal, point) + mask) > 1
    return keep_closest_blob(ops.binary_dilation_cross(cut, 1), point)


def box_around(center, radius, shape: Sequence[int]) -> list[list[int]]:
    """[[lo, hi)] per axis, `radius` voxels either side of `center` (truncated), clipped to the image."""
    return [[max(0, int(center[a] - radius[a])), min(shape[a], int(center[a] + radius[a]))] for a in range(3)]


@dataclass
class Volume:
    """A voxel array with its affine and nibabel's header zooms (float32): what upstream's NIfTI images carry."""

    data: np.ndarray
    affine: np.ndarray
    header_zooms: tuple | None = None  # a loaded file's pixdim; default: nibabel's zooms of a new image

    @property
    def zooms(self) -> tuple[np.float32, np.float32, np.float32]:
        return self.header_zooms if self.header_zooms is not None else ops.nifti_zooms(self.affine)

    def crop(self, bbox: list[list[int]], dtype=None) -> Volume:
        """cropping.crop_to_bbox_nifti: the box (float64 of the data cast to `dtype`), origin moved to it."""
        data, affine = ops.crop_to_bbox(self.data, self.affine, bbox)
        return Volume(np.asarray(data, dtype=np.float64).astype(self.data.dtype if dtype is None else dtype), affine)

    def crop_around(self, point, size_mm: float, dtype=None) -> Volume:
        """A cube of `size_mm` (per axis, in voxels by the header zooms) centred on the voxel `point`."""
        radius = (np.asarray([size_mm] * 3) / 2 / np.asarray(self.zooms)).astype(int)
        return self.crop(box_around(point, radius, self.data.shape), dtype)

    def voxel_of(self, point, other: Volume) -> np.ndarray:
        """A voxel position of `other`'s grid in this grid (through world space, as upstream computes it)."""
        return (np.linalg.inv(self.affine) @ other.affine @ np.append(point, 1))[:3]

    def nifti(self):
        import nibabel as nib

        return nib.Nifti1Image(self.data, self.affine)


def local_cross_section(aorta: Volume, point, normal, crop_mm: float) -> tuple[Volume, np.ndarray]:
    """The cross-section inside a `crop_mm` cube around `point` (fast: no full-volume plane)."""
    cropped = aorta.crop_around(point, crop_mm, np.uint8)
    section = cross_section(cropped.data, cropped.voxel_of(point, aorta), normal)
    return cropped, section.astype(np.uint8)


# --------------------------------------------------------------------------------------------- diameters


def boundary(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a background neighbour (scipy's cross erosion, outside counts as background)."""
    from scipy import ndimage

    inside = mask > 0
    return np.logical_xor(inside, ndimage.binary_erosion(inside))


def farthest_pair(points: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The two points farthest apart (first such pair in i < j order, as pdist + argmax pick it)."""
    if len(points) == 0:
        return 0.0, None, None
    if len(points) == 1:
        return 0.0, points[0].copy(), points[0].copy()
    candidates = _hull_candidates(points)
    coordinates = points[candidates].astype(np.int64)
    best, pair = -1, (0, 1)
    for start in range(0, len(coordinates) - 1, 256):
        rows = coordinates[start : start + 256]
        squared = ((rows[:, None, :] - coordinates[None, :, :]) ** 2).sum(axis=2)
        squared[np.tril(np.ones(squared.shape, dtype=bool), start)] = -1  # keep j > i only
        flat = int(np.argmax(squared))
        if squared.flat[flat] > best:
            best = int(squared.flat[flat])
            pair = (start + flat // len(coordinates), flat % len(coordinates))
    first, second = candidates[pair[0]], candidates[pair[1]]
    return float(np.sqrt(best)), points[first].copy(), points[second].copy()


def _hull_candidates(points: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the points a farthest pair can use: the convex hull's (all, for few or flat sets).

    Both ends of a farthest pair are hull vertices (distance to a point is strictly convex along any
    face), and keeping the original order keeps pdist's first-pair tie-break.
    """
    everything = np.arange(len(points))
    if len(points) < 64:
        return everything
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line or plane
        return everything
    return np.unique(np.concatenate([hull.vertices, hull.coplanar[:, 0]]))


def region_diameters(image: np.ndarray) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Per connected region (skimage's full connectivity, label order): the longest boundary chord and its ends."""
    from skimage.measure import label, regionprops

    for region in regionprops(label(image)):
        points = np.transpose(np.nonzero(boundary(region.image)))
        diameter, start, end = farthest_pair(points)
        offset = np.asarray(region.bbox[: image.ndim])
        yield diameter, start + offset, end + offset


def distance_mm(a, b, spacing) -> float:
    return np.sqrt(np.sum(((np.asarray(a) - np.asarray(b)) * spacing) ** 2))


def first_region_diameter_mm(image: np.ndarray, spacing) -> float | None:
    """Diameter (mm) of the first region, None when the image is empty."""
    region = next(region_diameters(image), None)
    return None if region is None else distance_mm(region[1], region[2], spacing)


def perpendicular_chord(mask: np.ndarray, start, end) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The longest boundary chord at most ~6° off perpendicular to start-end (then 12°, 30°), as upstream."""
    if start is None or end is None:
        return 0.0, None, None
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
                return lengths[best], points[first[best]], points[second[best]]
    return 0.0, None, None


@dataclass
class Chords:
    """A cross-section's diameter and perpendicular diameter (mm) with their end points (pixels)."""

    diameter: float
    perpendicular: float
    major: tuple[np.ndarray, np.ndarray] | None
    minor: tuple[np.ndarray, np.ndarray] | None


def chords(mask: np.ndarray, spacing=None) -> Chords:
    """Diameter and perpendicular diameter of a mask's first region (mm with `spacing`, else pixels)."""
    region = next(region_diameters(mask), None)
    if region is None:
        return Chords(0.0, 0.0, None, None)
    _, start, end = region
    _, start_pd, end_pd = perpendicular_chord(mask, start, end)

    def length(a, b) -> float:
        return float(np.linalg.norm(a - b)) if spacing is None else float(distance_mm(a, b, spacing))

    perpendicular = length(start_pd, end_pd) if start_pd is not None and end_pd is not None else 0.0
    return Chords(length(start, end), perpendicular, (start, end), (start_pd, end_pd) if start_pd is not None else None)


def slice_chords(mask: np.ndarray, spacing, affine: np.ndarray, z: int = 1) -> tuple[
    np.ndarray, np.ndarray, list | None, list | None
]:
    """Diameters of a 2D cut (mm) with the 4 end points as voxels (x, y, z) and in world mm (4 decimals)."""
    if mask.sum() < 5:
        return np.array(0.0), np.array(0.0), None, None
    found = chords(mask, spacing)
    if found.major is None or found.minor is None:
        return np.array(0.0), np.array(0.0), None, None
    ends = [point.tolist() + [int(z)] for point in (*found.major, *found.minor)]
    ends_mm = [(affine[:3, :3] @ point + affine[:3, 3]).round(4).tolist() for point in ends]
    return np.asarray(found.diameter), np.asarray(found.perpendicular), ends, ends_mm


def most_distant_points(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The voxel of `first` and the voxel of `second` farthest apart (first such pair in argwhere order)."""
    points1, points2 = np.argwhere(first), np.argwhere(second)
    if not len(points1) or not len(points2):
        return None, None
    best, result = 0, (None, None)
    for start in range(0, len(points1), 1024):
        squared = ((points1[start : start + 1024, None, :] - points2[None, :, :]) ** 2).sum(axis=2)
        flat = int(np.argmax(squared))
        if squared.flat[flat] > best:
            best = int(squared.flat[flat])
            row, column = np.unravel_index(flat, squared.shape)
            result = (points1[start + row], points2[column])
    return result


# --------------------------------------------------------------------------------------------- planes


def mask_normal(mask: np.ndarray) -> np.ndarray:
    """Unit normal of a flat mask: the direction of least spread of its voxels (PCA's last component)."""
    points = np.argwhere(mask > 0.5)
    if not points.size:
        raise ValueError("mask_normal: the mask has no voxels")
    if len(points) == 1:
        return np.array([0.0, 0.0, 1.0])
    centred = points - points.mean(axis=0)
    centred = centred - centred.mean(axis=0)  # scikit-learn's PCA centres again
    if len(points) >= 10 * points.shape[1]:  # its "covariance_eigh" solver: eigenvectors of the covariance
        _, vectors = np.linalg.eigh(centred.T @ centred / (len(points) - 1))
        normal = vectors[:, 0]  # the smallest eigenvalue's: PCA's last component
    else:
        normal = np.linalg.svd(centred, full_matrices=False)[2][-1]
    normal = np.asarray(normal, dtype=float)
    if len(normal) < 3:
        normal = np.pad(normal, (0, 3 - len(normal)))
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-10 else np.array([0.0, 0.0, 1.0])


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector if norm == 0 else vector / norm


def rotation_between(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation taking direction `source` onto `target` (Rodrigues; a half-turn for opposite ones)."""
    source, target = _unit(source), _unit(target)
    if not np.linalg.norm(source) or not np.linalg.norm(target):
        return np.eye(3)
    dot = np.clip(np.dot(source, target), -1.0, 1.0)
    if np.isclose(dot, 1):
        return np.eye(3)
    if np.isclose(dot, -1):
        axis = _unit(np.cross(source, np.eye(3)[np.argmin(np.abs(source))]))
        return 2 * np.outer(axis, axis) - np.eye(3)
    cross = np.cross(source, target)
    skew = np.array([[0, -cross[2], cross[1]], [cross[2], 0, -cross[0]], [-cross[1], cross[0], 0]])
    return np.eye(3) + skew + skew @ skew * (1 - dot) / np.linalg.norm(cross) ** 2


def fixed_size_box(mask: np.ndarray, zooms, size_mm: Sequence[float]) -> list[list[int]]:
    """A box of `size_mm` (per axis) around the mask's mean voxel (the image centre if it is empty)."""
    addon = (np.asarray(size_mm) / np.asarray(zooms)[:3]).astype(int)
    if mask.any():
        where = np.where(mask > 0)
        center = [int(np.mean(where[axis])) for axis in range(3)]
    else:
        center = [size // 2 for size in mask.shape]
    return box_around(center, (addon / 2).astype(int), mask.shape)


@dataclass
class PlaneCut:
    """A landmark's cross-section turned into the z-plane of its crop, with what lies on it."""

    plane: object  # nibabel image (uint8 values as float), the cut
    ct: object | None  # CT on the same grid (cubic interpolation), when given
    masks: list  # further masks (false lumen, true lumen) on the same grid
    to_world: np.ndarray  # affine from the turned grid's voxels to the original world positions


def turn_into_z_plane(
    roi: np.ndarray, affine: np.ndarray, size_mm: float, ct: np.ndarray | None = None,
    masks: Sequence[np.ndarray] = (), ct_dtype=np.int32,
) -> PlaneCut:
    """Crop `size_mm` around a cross-section and resample it so its plane becomes the z-plane (get_2d_plane).

    The rotation turns the section's PCA normal onto the crop's z axis about its centre; masks are
    resampled with nearest neighbour, the CT with cubic splines (nibabel.processing, as upstream).
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    whole = Volume(np.asarray(roi), np.asarray(affine, dtype=np.float64))
    bbox = fixed_size_box(whole.data > 0.5, whole.zooms, [size_mm] * 3)
    crop = whole.crop(bbox, np.uint8)
    crop_image = crop.nifti()
    data = crop_image.get_fdata()
    center_voxel = center_of(data)
    if center_voxel is None:
        center_voxel, normal_voxel = (np.asarray(data.shape) - 1) / 2, np.array([0.0, 0.0, 1.0])
    else:
        normal_voxel = mask_normal(data)
    linear = crop.affine[:3, :3]
    center = linear @ center_voxel + crop.affine[:3, 3]
    normal, target = linear @ normal_voxel, linear @ np.array([0, 0, 1])
    if np.dot(normal, target) < 0:
        target = -target
    rotation = np.eye(4)
    rotation[:3, :3] = rotation_between(normal, target)
    to_origin, back = np.eye(4), np.eye(4)
    to_origin[:3, 3] -= center
    back[:3, 3] += center
    combined = back @ rotation @ to_origin
    turned_affine = combined @ crop.affine

    def turn(volume: Volume, order: int):
        return resample_from_to(nib.Nifti1Image(volume.nifti().get_fdata(), turned_affine), crop_image, order=order)

    turned_ct = None if ct is None else turn(Volume(ct, whole.affine).crop(bbox, ct_dtype), 3)
    turned_masks = [turn(Volume(mask, whole.affine).crop(bbox, np.uint8), 0) for mask in masks]
    return PlaneCut(turn(crop, 0), turned_ct, turned_masks, np.linalg.inv(combined) @ crop.affine)


def smooth_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred mask thresholded at 0.5 (uint8): rounds off the aorta before thinning."""
    from scipy import ndimage

    return (ndimage.gaussian_filter(mask.astype(np.float32), sigma=sigma) > 0.5).astype(np.uint8)


def fill_closed(mask2d: np.ndarray) -> np.ndarray:
    """A 2D cut closed (cross, once) and its holes filled, uint8: the area and diameters are read from it."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(ndimage.binary_closing(mask2d)).astype(np.uint8)
