"""tsrt.totalseg.ops against its oracles: TotalSegmentator 2.18's own functions, scipy.ndimage, nibabel.

Every comparison is exact (np.array_equal on data, affines, bboxes) unless a tolerance is stated.
The oracles need the dev extra (scipy, totalsegmentator); the runtime module must not.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.totalseg import ops

ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is the zoom/label oracle (dev extra)")
ts_resampling = pytest.importorskip("totalsegmentator.resampling", reason="TotalSegmentator is the oracle (dev extra)")
from totalsegmentator import alignment as ts_alignment  # noqa: E402
from totalsegmentator import cropping as ts_cropping  # noqa: E402
from totalsegmentator import libs as ts_libs  # noqa: E402
from totalsegmentator import postprocessing as ts_pp  # noqa: E402
from totalsegmentator.map_to_binary import class_map  # noqa: E402
from totalsegmentator.nifti_ext_header import add_label_map_to_nifti  # noqa: E402


def _oblique_affine(zooms=(0.8, 0.7, 2.5)) -> np.ndarray:
    """A rotated, flipped affine with non-float32-exact spacings."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms) @ np.diag([-1, 1, 1])
    affine[:3, 3] = [12.5, -40.25, 7.0]
    return affine


@pytest.fixture(scope="module")
def ct_img(shared_data: Path) -> nib.Nifti1Image:
    """The example CT as TotalSegmentator sees it after `nib.Nifti1Image(img.get_fdata(), img.affine)`."""
    img = nib.load(shared_data / "example_ct.nii.gz")
    return nib.Nifti1Image(img.get_fdata(), img.affine)


@pytest.fixture(scope="module")
def label_map_img(shared_data: Path) -> nib.Nifti1Image:
    """A real 117-class 'total' label map (3 mm) to postprocess."""
    return nib.load(shared_data / "example_seg_fast.nii.gz")


# --------------------------------------------------------------------------- zoom


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("zoom", [2.0, 0.5], ids=["3mm-to-1.5mm", "3mm-to-6mm"])
def test_zoom_bit_equal_to_scipy_on_real_ct(ct_img: nib.Nifti1Image, order: int, zoom: float) -> None:
    data = ct_img.get_fdata()
    ours = ops.zoom_like_scipy(data, [zoom] * 3, order=order)
    theirs = ndimage.zoom(data, [zoom] * 3, order=order, mode="nearest")
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 5])
def test_zoom_bit_equal_on_odd_shapes_and_dtypes(order: int) -> None:
    rng = np.random.default_rng(order)
    cases = [
        ((7, 13, 5), (1.37, 0.61, 2.0 / 3.0), np.float64),
        ((9, 1, 6), (0.5, 3.0, 1.5), np.float64),  # an axis of length 1, shape ties 4.5 -> 4, 9 -> 9
        ((11, 8, 3), (0.35, 1.01, 1.0), np.int16),  # integer output: scipy rounds half away from zero
        ((5, 5, 5), (1.0, 1.0, 1.0), np.float64),  # all-ones early exit
    ]
    for shape, zoom, dtype in cases:
        data = (rng.normal(size=shape) * 300).astype(dtype)
        data[0, 0, 0] = -1024
        ours = ops.zoom_like_scipy(data, zoom, order=order)
        theirs = ndimage.zoom(data, zoom, order=order, mode="nearest")
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (shape, zoom)
        assert np.array_equal(ours, theirs), (shape, zoom, dtype, np.abs(ours.astype(float) - theirs).max())


def test_zoom_order0_ties_and_output_shape_rounding() -> None:
    # 5 -> 3: coordinates 0, 2, 4 exactly; 4 -> 7: coordinates o*0.5, ties at .5 go up (floor(c + 0.5)).
    data = np.arange(4 * 5 * 4, dtype=np.float64).reshape(4, 5, 4)
    for zoom in [(1.75, 0.6, 1.75), (0.5, 0.5, 0.5), (1.5, 1.3, 0.9)]:
        assert np.array_equal(ops.zoom_like_scipy(data, zoom, order=0), ndimage.zoom(data, zoom, order=0, mode="nearest"))
    for shape, zoom in [((5, 7, 9), 0.5), ((3, 11, 13), 1.5), ((101, 122, 3), 0.5)]:
        expected = ndimage.zoom(np.zeros(shape), zoom, order=0).shape
        assert ops.zoom_output_shape(shape, zoom) == expected
    assert ops.zoom_output_shape((5, 7, 9), 0.5) == (2, 4, 4)  # half to even


def test_zoom_output_shape_argument_matches_target_shape_zoom() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 5, (10, 12, 9)).astype(np.float64)
    target = (23, 5, 9)
    theirs = ndimage.zoom(data, np.array(target) / np.array(data.shape), order=0, mode="nearest")
    assert np.array_equal(ops.zoom_like_scipy(data, output_shape=target, order=0), theirs)


def test_zoom_rejects_what_it_does_not_reproduce() -> None:
    with pytest.raises(ValueError, match="mode"):
        ops.zoom_like_scipy(np.zeros((2, 2, 2)), 2, order=1, mode="constant")
    with pytest.raises(ValueError, match="3D"):
        ops.zoom_like_scipy(np.zeros((2, 2)), 2, order=1)


# --------------------------------------------------------------------------- change_spacing


def _upstream_change_spacing(img: nib.Nifti1Image, *args, **kwargs) -> nib.Nifti1Image:
    return ts_resampling.change_spacing(img, *args, nr_cpus=1, **kwargs)


def test_change_spacing_down_and_up_like_totalsegmentator(ct_img: nib.Nifti1Image) -> None:
    """The input path (order 1 -> int32), then the way back (target_shape, order 0 -> uint8, force_affine)."""
    data, affine = ct_img.get_fdata(), ct_img.affine
    zooms = ct_img.header.get_zooms()
    assert zooms == ops.nifti_zooms(affine)
    for spacing, order in [([1.5, 1.5, 1.5], 1), ([6.0, 6.0, 6.0], 1), ([1.5, 1.5, 1.5], 0), (2.2, 1)]:
        theirs = _upstream_change_spacing(ct_img, spacing, order=order, dtype=np.int32)
        ours, ours_affine = ops.change_spacing(data, affine, zooms, spacing, order=order, dtype=np.int32)
        assert ours.dtype == np.int32 and np.array_equal(ours, np.asanyarray(theirs.dataobj)), spacing
        assert np.array_equal(ours_affine, theirs.affine)

    low, low_affine = ops.change_spacing(data, affine, zooms, [6.0] * 3, order=1, dtype=np.int32)
    labels = (np.abs(low) % 7).astype(np.uint8)
    labels_img = nib.Nifti1Image(labels, low_affine)
    theirs = _upstream_change_spacing(labels_img, [6.0] * 3, data.shape, order=0, dtype=np.uint8, force_affine=affine)
    ours, ours_affine = ops.change_spacing(
        labels, low_affine, labels_img.header.get_zooms(), [6.0] * 3, target_shape=data.shape, order=0, dtype=np.uint8, force_affine=affine
    )
    assert ours.shape == data.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, np.asanyarray(theirs.dataobj)) and np.array_equal(ours_affine, theirs.affine)


def test_change_spacing_int32_cast_truncates_and_float_data(ct_img: nib.Nifti1Image) -> None:
    """Fractional intensities (MR, scaled CT) are truncated toward zero by astype(int32), not rounded."""
    rng = np.random.default_rng(5)
    data = rng.normal(size=(20, 17, 9)) * 3.3
    affine = _oblique_affine()
    img = nib.Nifti1Image(data, affine)
    zooms = img.header.get_zooms()
    for kwargs in [dict(order=1, dtype=np.int32), dict(order=3, dtype=np.int32), dict(order=1, dtype=None)]:
        theirs = _upstream_change_spacing(img, [1.5, 1.5, 1.5], **kwargs)
        ours, ours_affine = ops.change_spacing(data, affine, zooms, [1.5, 1.5, 1.5], **kwargs)
        assert np.array_equal(ours, np.asanyarray(theirs.dataobj)), kwargs
        assert np.array_equal(ours_affine, theirs.affine)
    assert ops.change_spacing(np.array([[[-0.7, 0.7]]]), np.eye(4), (1.0, 1.0, 1.0), [1.0, 0.5, 1.0], order=1, dtype=np.int32)[0].min() == 0


def test_change_spacing_equal_spacing_returns_input_untouched() -> None:
    """No resampling, no dtype cast, no force_affine - exactly like upstream's early return."""
    data = np.full((4, 5, 6), 2.5)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0]))
    theirs = _upstream_change_spacing(img, 1.5, order=1, dtype=np.int32, force_affine=np.eye(4))
    ours, ours_affine = ops.change_spacing(data, img.affine, img.header.get_zooms(), 1.5, order=1, dtype=np.int32, force_affine=np.eye(4))
    assert theirs is img and ours is data and ours_affine is img.affine


def test_change_spacing_4d_volume_by_volume() -> None:
    rng = np.random.default_rng(8)
    data = rng.normal(size=(6, 7, 5, 2)) * 100
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    theirs = _upstream_change_spacing(img, [1.0, 1.5, 1.5], order=1, dtype=np.int32)
    ours, _ = ops.change_spacing(data, img.affine, img.header.get_zooms(), [1.0, 1.5, 1.5], order=1, dtype=np.int32)
    assert np.array_equal(ours, np.asanyarray(theirs.dataobj))


def test_nifti_zooms_are_nibabels_header_zooms() -> None:
    for affine in [_oblique_affine(), np.diag([-0.8, 0.8, 1.25, 1.0])]:
        assert ops.nifti_zooms(affine) == nib.Nifti1Image(np.zeros((2, 3, 4)), affine).header.get_zooms()


# --------------------------------------------------------------------------- canonical


def test_canonical_round_trip_on_lps_mr(shared_data: Path) -> None:
    mr = nib.load(shared_data / "example_mr_sm.nii.gz")
    assert nib.aff2axcodes(mr.affine) == ("L", "P", "S")
    img_in = nib.Nifti1Image(mr.get_fdata(), mr.affine)

    theirs = ts_alignment.as_closest_canonical(img_in)
    data, affine = ops.as_closest_canonical(img_in.get_fdata(), img_in.affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.array_equal(data, theirs.get_fdata()) and np.array_equal(affine, theirs.affine)
    assert ops.nifti_zooms(affine) == theirs.header.get_zooms()

    labels = (np.asarray(data) > 100).astype(np.uint8)
    back_theirs = ts_alignment.undo_canonical(nib.Nifti1Image(labels, affine), mr)
    back, back_affine = ops.undo_canonical(labels, affine, mr.affine)
    assert np.array_equal(back, np.asanyarray(back_theirs.dataobj)) and np.array_equal(back_affine, back_theirs.affine)
    assert np.array_equal(back_affine, mr.affine) and np.array_equal(back, mr.get_fdata() > 100)


def test_canonical_is_identity_for_ras_and_handles_permuted_axes(ct_img: nib.Nifti1Image) -> None:
    data = ct_img.get_fdata()
    same, same_affine = ops.as_closest_canonical(data, ct_img.affine)
    assert same is data and same_affine is ct_img.affine
    permuted = nib.Nifti1Image(np.zeros((3, 4, 5)), _oblique_affine()[:, [2, 0, 1, 3]])
    theirs = nib.as_closest_canonical(permuted)
    ours, ours_affine = ops.as_closest_canonical(np.asanyarray(permuted.dataobj), permuted.affine)
    assert ours.shape == theirs.shape and np.array_equal(ours_affine, theirs.affine)


# --------------------------------------------------------------------------- crop


def test_crop_to_mask_and_undo_crop_like_totalsegmentator() -> None:
    rng = np.random.default_rng(2)
    affine = _oblique_affine((0.8, 0.7, 2.5))
    data = rng.normal(size=(60, 50, 30)) * 40  # fractional: the int32 cast must truncate
    img_in = nib.Nifti1Image(data, affine)
    mask = np.zeros(data.shape, dtype=np.uint8)
    mask[20:31, 5:9, 12:14] = 1
    mask[2, 40, 20] = 1
    mask_img = nib.Nifti1Image(mask, affine)
    for addon in ([3, 3, 3], [20, 20, 20], [0, 0, 0], [2.0, 7.0, 10.0]):  # 20 mm / float32(0.8) -> 24 voxels
        theirs, theirs_bbox = ts_cropping.crop_to_mask(img_in, mask_img, addon=addon, dtype=np.int32)
        ours, ours_affine, bbox = ops.crop_to_mask(data, affine, img_in.header.get_zooms(), mask, addon, dtype=np.int32)
        assert bbox == theirs_bbox, addon
        assert ours.dtype == np.int32 and np.array_equal(ours, np.asanyarray(theirs.dataobj))
        assert np.array_equal(ours_affine, theirs.affine)

        labels = (ours % 3).astype(np.uint8)
        restored_theirs = ts_cropping.undo_crop(nib.Nifti1Image(labels, ours_affine), img_in, bbox)
        restored = ops.undo_crop(labels, data.shape, bbox)
        assert restored.dtype == np.float64 and np.array_equal(restored, restored_theirs.get_fdata())
    assert ops.crop_addon_voxels([20, 20, 20], img_in.header.get_zooms()).tolist() == [24, 28, 8]


def test_bbox_from_mask_empty_and_clipped() -> None:
    mask = np.zeros((5, 6, 7))
    assert ops.bbox_from_mask(mask, outside_value=0) == ts_cropping.get_bbox_from_mask(mask, outside_value=0)
    mask[0, 5, 3] = 1
    for addon in (0, 2, [1, 0, 9]):
        assert ops.bbox_from_mask(mask, outside_value=0, addon=addon) == ts_cropping.get_bbox_from_mask(mask, outside_value=0, addon=addon)


# --------------------------------------------------------------------------- triple split


def _upstream_split_source() -> str:
    """The lines of nnUNet_predict_image that split and recombine (read as text: importing nnunet.py needs torch)."""
    from importlib.util import find_spec

    return Path(find_spec("totalsegmentator").origin).with_name("nnunet.py").read_text()


def test_triple_split_arithmetic_matches_upstream_code() -> None:
    source = _upstream_split_source()
    for line in [
        "nr_voxels_thr = 512*512*900",
        "do_triple_split = np.prod(ss) > nr_voxels_thr and ss[2] > 200 and multimodel",
        "third = img_in_rsp.shape[2] // 3",
        "margin = 20",
        "img_in_rsp_data[:, :, :third+margin]",
        "img_in_rsp_data[:, :, third+1-margin:third*2+margin]",
        "img_in_rsp_data[:, :, third*2+1-margin:]",
        'combined_img[:,:,:third] = nib.load(tmp_dir / "s01.nii.gz").get_fdata()[:,:,:-margin]',
        'combined_img[:,:,third:third*2] = nib.load(tmp_dir / "s02.nii.gz").get_fdata()[:,:,margin-1:-margin]',
        'combined_img[:,:,third*2:] = nib.load(tmp_dir / "s03.nii.gz").get_fdata()[:,:,margin-1:]',
    ]:
        assert line in source, f"TotalSegmentator changed its triple split: {line!r} is gone"

    for z in (601, 602, 603, 201, 61):
        shape = (4, 3, z)
        volume = np.broadcast_to(np.arange(z) % 250, shape).astype(np.uint8)
        third, margin = z // 3, 20
        expected = [volume[:, :, : third + margin], volume[:, :, third + 1 - margin : third * 2 + margin], volume[:, :, third * 2 + 1 - margin :]]
        parts = [volume[:, :, s] for s in ops.split_in_three_along_z(shape)]
        assert all(np.array_equal(a, b) for a, b in zip(parts, expected)), z
        assert np.array_equal(ops.combine_three_parts(parts, shape), volume), z


def test_should_split() -> None:
    big = (512, 512, 901)
    assert ops.should_split(big, multimodel=True)
    assert not ops.should_split((512, 512, 900), multimodel=True)  # not more than the threshold
    assert not ops.should_split(big, multimodel=False)
    assert not ops.should_split((2000, 2000, 200), multimodel=True)  # z must exceed 200
    assert ops.should_split((10, 10, 30), multimodel=False, force_split=True)
    assert not ops.should_split(big, multimodel=True, force_split=True, cascade=True)


# --------------------------------------------------------------------------- postprocessing


def _blobby_labels(seed: int, shape=(40, 36, 30)) -> np.ndarray:
    """Several labels, each in several blobs of varied sizes, incl. two equal-size largest blobs of label 2."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, dtype=np.uint8)
    for _ in range(60):
        label = int(rng.integers(1, 5))
        corner = rng.integers(0, np.array(shape) - 4)
        size = rng.integers(1, 5, 3)
        data[tuple(slice(c, c + s) for c, s in zip(corner, size))] = label
    data[0:3, 0:3, 0:3] = 2
    data[-3:, -3:, -3:] = 2
    data[data == 2] = 0
    data[0:4, 0:4, 0:4] = 2  # two 64-voxel cubes of label 2, far apart: the tie goes to the first
    data[-4:, -4:, -4:] = 2
    data[10, 10, 10] = 3
    return data


CLASS_MAP = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "body_trunc"}


def test_connected_components_numbered_like_scipy() -> None:
    rng = np.random.default_rng(11)
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(1, 25, 3))
        mask = rng.random(shape) < rng.uniform(0.2, 0.7)
        ours, count = ops.label_components(mask)
        theirs, theirs_count = ndimage.label(mask)
        assert count == theirs_count and np.array_equal(ours, theirs)


def test_keep_largest_blob_multilabel_like_upstream() -> None:
    for seed in range(4):
        data = _blobby_labels(seed)
        rois = ["spleen", "kidney_left", "body_trunc", "liver"]
        theirs = ts_pp.keep_largest_blob_multilabel(data.copy(), CLASS_MAP, rois, quiet=True)
        ours = ops.keep_largest_blob_multilabel(data.copy(), CLASS_MAP, rois)
        assert np.array_equal(ours, theirs), seed
        assert not np.array_equal(ours, data)
    data = _blobby_labels(0)
    kept = ops.keep_largest_blob_multilabel(data.copy(), CLASS_MAP, ["spleen"])
    assert (kept == 2).sum() == 64 and kept[0, 0, 0] == 2


def test_remove_small_blobs_multilabel_like_upstream_incl_float32_threshold() -> None:
    zooms = (np.float32(1.5), np.float32(1.5), np.float32(1.5))
    threshold_img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.diag([1.5, 1.5, 1.5, 1]))
    upstream_interval = [200 / np.prod(threshold_img.header.get_zooms()), 1e10]
    interval = ops.blob_size_interval(200, zooms)
    assert interval == upstream_interval and np.asarray(interval[0]).dtype == np.float32
    for seed in range(4):
        data = _blobby_labels(seed)
        for interval in ([8, 1e10], [1, 30], [float(np.float32(200 / np.float32(3.375))), 1e10], [27, 64]):
            rois = list(CLASS_MAP.values())
            theirs = ts_pp.remove_small_blobs_multilabel(data.copy(), CLASS_MAP, rois, interval=interval, quiet=True)
            ours = ops.remove_small_blobs_multilabel(data.copy(), CLASS_MAP, rois, interval=interval)
            assert np.array_equal(ours, theirs), (seed, interval)


def test_postprocessing_on_a_real_label_map(label_map_img: nib.Nifti1Image) -> None:
    data = np.asanyarray(label_map_img.dataobj).astype(np.uint8)
    total = class_map["total"]
    rois = list(total.values())
    interval = ops.blob_size_interval(200, label_map_img.header.get_zooms())
    theirs = ts_pp.remove_small_blobs_multilabel(data.copy(), total, rois, interval=interval, quiet=True)
    ours = ops.remove_small_blobs_multilabel(data.copy(), total, rois, interval=interval)
    assert np.array_equal(ours, theirs) and not np.array_equal(ours, data)
    some = rois[:40]
    theirs = ts_pp.keep_largest_blob_multilabel(data.copy(), total, some, quiet=True)
    assert np.array_equal(ops.keep_largest_blob_multilabel(data.copy(), total, some), theirs)


def test_remove_auxiliary_labels_like_upstream() -> None:
    task = "appendicular_bones"
    rng = np.random.default_rng(4)
    data = rng.integers(0, 16, (9, 8, 7)).astype(np.uint8)
    img = nib.Nifti1Image(data.astype(np.float64), np.eye(4))
    theirs = ts_pp.remove_auxiliary_labels(img, task)
    ours = ops.remove_auxiliary_labels(data, class_map[f"{task}_auxiliary"].keys())
    assert ours.dtype == np.uint8 and np.array_equal(ours, np.asanyarray(theirs.dataobj))
    assert ours.max() <= max(class_map[task]) < data.max()


def test_reorder_multilabel_like_v1_like_upstream(label_map_img: nib.Nifti1Image) -> None:
    data = np.asanyarray(label_map_img.dataobj).astype(np.uint8)
    theirs = ts_libs.reorder_multilabel_like_v1(data, class_map["total"], class_map["total_v1"])
    ours = ops.reorder_multilabel_like_v1(data, class_map["total"], class_map["total_v1"])
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs) and not np.array_equal(ours, data)


def test_keep_roi_subset() -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 7
    expected = data.copy()
    expected *= np.isin(expected, [2, 5])
    assert np.array_equal(ops.keep_roi_subset(data, [2, 5]), expected)


def test_morphology_and_remove_outside_of_mask_like_upstream() -> None:
    rng = np.random.default_rng(9)
    for _ in range(6):
        shape = tuple(int(n) for n in rng.integers(3, 20, 3))
        mask = rng.random(shape) < rng.uniform(0.01, 0.6)
        for iterations in (0, 1, 2, 3, 6):
            assert np.array_equal(ops.binary_dilation_cross(mask, iterations), ndimage.binary_dilation(mask, iterations=iterations))
            assert np.array_equal(ops.binary_erosion_cross(mask, iterations), ndimage.binary_erosion(mask, iterations=iterations))
        seg = rng.integers(0, 5, shape).astype(np.uint8)
        for addon in (0, 1, 4):
            theirs = ts_pp.remove_outside_of_mask(seg.copy().astype(np.float64), mask.astype(np.float64), addon=addon)
            assert np.array_equal(ops.remove_outside_of_mask(seg.copy(), mask.astype(np.uint8), addon=addon), theirs)
    empty = np.zeros((4, 4, 4))
    assert not ops.binary_dilation_cross(empty, 0).any()


def test_remove_outside_dilation_voxels_like_upstream() -> None:
    assert "int(remove_outside_dilation / np.mean(img_in_orig.header.get_zooms()))" in _upstream_split_source()
    for affine in [np.diag([0.7, 0.7, 1.0, 1.0]), _oblique_affine(), np.diag([3.3, 3.3, 3.4, 1.0])]:
        zooms = nib.Nifti1Image(np.zeros((2, 2, 2)), affine).header.get_zooms()
        for dilation_mm in (10, 5, 3):
            assert ops.remove_outside_dilation_voxels(dilation_mm, zooms) == int(dilation_mm / np.mean(zooms))
    assert ops.remove_outside_dilation_voxels(10, (np.float32(0.8),) * 3) == 12


def test_extract_skin_like_upstream(ct_img: nib.Nifti1Image) -> None:
    ct = ct_img.get_fdata()
    body = (ct > -500).astype(np.uint8)
    body[:, :, :2] = 1  # touch the image border: erosion treats outside as background
    theirs = ts_pp.extract_skin(ct_img, nib.Nifti1Image(body, ct_img.affine))
    ours = ops.extract_skin(ct, body)
    assert ours.dtype == np.uint8 and ours.any() and np.array_equal(ours, np.asanyarray(theirs.dataobj))


# --------------------------------------------------------------------------- combine masks


def test_combine_masks_like_upstream(tmp_path: Path, label_map_img: nib.Nifti1Image) -> None:
    data = np.asanyarray(label_map_img.dataobj).astype(np.uint8)
    total = class_map["total"]
    multilabel_file = tmp_path / "seg.nii.gz"
    nib.save(add_label_map_to_nifti(nib.Nifti1Image(data, label_map_img.affine), total), multilabel_file)
    for class_type in ["ribs", "vertebrae", "vertebrae_ribs", "lung", "lung_left", "lung_right", "pelvis", ["liver", "spleen"]]:
        theirs = ts_libs.combine_masks(multilabel_file, class_type)
        ours = ops.combine_masks_from_labels(data, total, class_type)
        assert np.array_equal(ours, np.asanyarray(theirs.dataobj)), class_type
        assert ours.any() or class_type == "pelvis", class_type  # the example is a chest CT

    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for name in ops.combine_mask_names("lung") + ops.combine_mask_names("pelvis"):
        nib.save(nib.Nifti1Image((data == {v: k for k, v in total.items()}[name]).astype(np.uint8), label_map_img.affine), masks_dir / f"{name}.nii.gz")
    for class_type in ["lung", "pelvis"]:
        theirs = ts_libs.combine_masks(masks_dir, class_type)
        ours, affine = ops.combine_masks_from_dir(masks_dir, class_type)
        assert np.array_equal(ours, np.asanyarray(theirs.dataobj)) and np.array_equal(affine, theirs.affine)
    with pytest.raises(ValueError, match="Could not find"):
        ops.combine_masks_from_dir(masks_dir, "ribs")
    with pytest.raises(ValueError, match="unknown mask combination"):
        ops.combine_mask_names("heart")


def test_combine_mask_classes_follow_upstream_source() -> None:
    """The combinations are written out in tsrt; make sure TotalSegmentator still defines them the same way."""
    from totalsegmentator.map_to_binary import class_map_5_parts

    assert ops.COMBINE_MASK_CLASSES["vertebrae"] == list(class_map_5_parts["class_map_part_vertebrae"].values())
    source = inspect.getsource(ts_libs.combine_masks)
    for name, classes in ops.COMBINE_MASK_CLASSES.items():
        if name in ("ribs", "vertebrae", "vertebrae_ribs"):
            continue
        assert f'class_type == "{name}"' in source and all(f'"{c}"' in source for c in classes), name


def test_runtime_modules_work_without_scipy_or_torch() -> None:
    """Hide scipy/torch/TotalSegmentator/nnU-Net from the import system and run a few operations."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('scipy', 'torch', 'totalsegmentator', 'nnunetv2'):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import numpy as np
from tsrt.totalseg import ops
data = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
assert ops.zoom_like_scipy(data, 2, order=1).shape == (6, 8, 10)
assert ops.change_spacing(data, np.eye(4), (1.0, 1.0, 1.0), 0.5, order=0, dtype=np.int32)[0].dtype == np.int32
assert ops.keep_largest_blob(data > 30).sum() == 29
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- vertebrae_pp


def _vertebrae_stack(labels_bottom_up: list[int], mixed: bool, shape=(24, 22, 60)) -> np.ndarray:
    """Separate vertebral bodies stacked along the third axis plus a speck; `mixed` leaks a label into its neighbour."""
    data = np.zeros(shape, dtype=np.uint8)
    z = 2
    for index, label in enumerate(labels_bottom_up):
        height = 5 + index % 2
        data[6 + index % 3 : 16, 5 : 15 + index % 2, z : z + height] = label
        if mixed and index == 1:
            data[10:12, 8:10, z : z + 2] = labels_bottom_up[0]
        z += height + 1
    data[1, 1, 1] = labels_bottom_up[0]  # a one-voxel component, below the size threshold
    return data


@pytest.mark.parametrize(
    "labels, mixed",
    [
        ([24, 23, 22, 21, 20], False),  # labels do not touch: dilation only
        ([24, 22, 22, 21, 19], True),  # mixed up, L5 present: count from the bottom
        ([5, 4, 3, 2, 1], True),  # C1 but no L5: count from the top
        ([12, 11, 10, 9, 9, 7], True),
    ],
)
def test_postprocess_vertebrae_pp_like_upstream(labels: list[int], mixed: bool) -> None:
    label_map = class_map["vertebrae_pp"]
    data = _vertebrae_stack(labels, mixed)
    spacing = (np.float32(1.5), np.float32(1.5), np.float32(1.5))
    vox_vol = np.prod(spacing)
    for kwargs in [
        dict(voxel_volume=vox_vol, voxel_spacing=spacing),
        dict(voxel_volume=vox_vol, voxel_spacing=(np.float32(0.8), np.float32(0.8), np.float32(2.5)), dilation_mm=2),
    ]:
        theirs = ts_pp.postprocess_vertebrae_pp(data.copy(), label_map, **kwargs)
        ours = ops.postprocess_vertebrae_pp(data.copy(), label_map, **kwargs)
        assert ours.dtype == np.uint8 and np.array_equal(ours, theirs), kwargs
        assert (ours > 0).sum() > (data > 0).sum()
        assert (ours[1, 1, 1] == 0) == mixed  # only the relabelling path drops small components


def test_postprocess_vertebrae_pp_single_component_where_upstream_crashes() -> None:
    """Upstream wraps center_of_mass's one-element list once more and raises IndexError; we relabel it."""
    label_map = class_map["vertebrae_pp"]
    data = np.zeros((10, 10, 12), dtype=np.uint8)
    data[2:8, 2:8, 2:6] = 24
    data[2:8, 2:8, 6:10] = 23  # touching: one component of 288 voxels
    with pytest.raises(IndexError):
        ts_pp.postprocess_vertebrae_pp(data.copy(), label_map)
    ours = ops.postprocess_vertebrae_pp(data.copy(), label_map, dilation_mm=0)
    assert np.array_equal(ours, np.where(data > 0, 24, 0))


def test_refine_vertebrae_pp_with_body_mask_like_upstream() -> None:
    label_map = class_map["vertebrae_pp"]
    data = _vertebrae_stack([24, 23, 22], mixed=False)
    body = np.zeros(data.shape, dtype=np.uint8)
    body[4:20, 3:19, 0:30] = 1
    body[4:20, 3:19, 30:40] = 2
    spacing = (np.float32(0.7), np.float32(0.7), np.float32(1.25))
    theirs = ts_pp.refine_vertebrae_pp_with_body_mask(data.copy(), body, label_map, voxel_spacing=spacing, dilation_mm=2)
    ours = ops.refine_vertebrae_pp_with_body_mask(data.copy(), body, label_map, voxel_spacing=spacing, dilation_mm=2)
    assert np.array_equal(ours, theirs)
    with pytest.raises(ValueError, match="shapes do not match"):
        ops.refine_vertebrae_pp_with_body_mask(data, body[:-1], label_map)


def test_structured_dilation_like_scipy() -> None:
    rng = np.random.default_rng(12)
    for shape in [(3, 4, 2), (5, 5, 5), (2, 2, 2), (4, 3, 5)]:
        structure = rng.random(shape) < 0.6
        mask = rng.random((9, 11, 7)) < 0.1
        assert np.array_equal(ops.binary_dilation_structure(mask, structure), ndimage.binary_dilation(mask, structure=structure))
    for spacing, radius in [((1.5, 1.5, 1.5), 3), ((np.float32(0.8), np.float32(0.8), np.float32(2.5)), 3), ((1.0, 1.0, 1.0), 0)]:
        assert np.array_equal(ops.ellipsoid_structure(spacing, radius), ts_pp.get_ellipsoid_structuring_element(spacing, radius))
