"""Cross-sections of the aorta: planes through the mask, their blobs and their diameters.

The aorta report measures a landmark by cutting the mask with the plane normal to the centerline
(a slab two voxels thick, grown by one voxel), keeping the cut's blob nearest to the centerline
point, turning that cut into the z-plane and measuring the longest chord between boundary pixels
(the diameter) and the longest chord roughly perpendicular to it. These are TotalSegmentator's
aorta_report/geometry*.py steps. The plane, borders, labels, chords and the turn are the pulmonary
report's (tsrt.reports.pulmonary_geometry, tested voxel for voxel against scipy, scikit-image and
upstream's functions); what stays here runs on scipy and nibabel as upstream does: the closest
blob (scipy's labels, upstream's per-blob mean), the PCA normal, the resampling of the turned cut,
and a convex-hull shortcut for the long chords of 3D cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tsrt.errors import require_module
from tsrt.reports import pulmonary_geometry as geometry
from tsrt.reports.pulmonary_geometry import box_around, distance_mm, draw_plane, fixed_size_box
from tsrt.totalseg import ops

FEATURE = "The aorta report"
EXTRA = "reports"


def require_scientific() -> None:
    """scipy and scikit-image (the `reports` extra), or one line saying how to install them."""
    require_module("scipy", FEATURE, EXTRA)
    require_module("skimage", FEATURE, EXTRA, called="scikit-image")


def keep_closest_blob(mask: np.ndarray, reference) -> np.ndarray:
    """The 26-connected blob whose voxels lie closest (on average) to `reference`; `mask` itself if it is empty.

    Upstream's arithmetic (scipy's labels, np.mean per blob), which the pulmonary report's bincount
    average need not match in the last bit, so near-ties between blobs could go the other way there.
    """
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
    cut = (draw_plane(mask.shape, normal, point) + mask) > 1
    return keep_closest_blob(ops.binary_dilation_cross(cut, 1), point)


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


def farthest_pair(points: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """The two points farthest apart (first such pair in i < j order, as pdist + argmax pick it).

    The pulmonary report's search, over the convex hull's points only: 3D cuts have thousands of
    border voxels, and both ends of a farthest pair are hull vertices.
    """
    return geometry.farthest_pair(points[_hull_candidates(points)])


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


def first_region_diameter_mm(image: np.ndarray, spacing) -> float | None:
    """Diameter (mm) of the first region, None when the image is empty."""
    region = geometry.region_diameter(image, farthest_pair)
    return None if region is None else distance_mm(region[1], region[2], spacing)


def slice_chords(mask: np.ndarray, spacing, affine: np.ndarray, z: int = 1) -> tuple[
    np.ndarray, np.ndarray, list | None, list | None
]:
    """Diameters of a 2D cut (mm) with the 4 end points as voxels (x, y, z) and in world mm (4 decimals)."""
    found = geometry.slice_diameters(mask, spacing)
    if found is None:
        return np.array(0.0), np.array(0.0), None, None
    ends = [
        point.tolist() + [int(z)] for point in (found.start, found.end, found.start_perpendicular, found.end_perpendicular)
    ]
    ends_mm = [(affine[:3, :3] @ point + affine[:3, 3]).round(4).tolist() for point in ends]
    return np.asarray(found.diameter_mm), np.asarray(found.perpendicular_mm), ends, ends_mm


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
    """Unit normal of a flat mask: the direction of least spread of its voxels (PCA's last component).

    Not the pulmonary report's mask_normal (scikit-learn's arithmetic bit for bit): this covariance
    differs from it in the last bits and the sign is not normalised, so sharing it could move a voxel
    on a plane's edge and change the aorta's numbers.
    """
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
    combined = geometry.turn_onto_z(crop_image.get_fdata(), crop.affine, mask_normal)
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
