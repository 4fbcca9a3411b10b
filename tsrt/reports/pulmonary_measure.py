"""Measuring the pulmonary artery's cross-sections, as TotalSegmentator 2.18's pulmonary_report measures them.

From the CT the models ran on, the artery mask and the five landmark masks (tsrt/reports/pulmonary.py
runs the models and writes the files):

    measuring grid: the annulus mask's grid in RAS, cropped to the artery's largest blob + 20 mm, at 0.8 mm
    ─► CT (cubic), artery (nearest; largest blob, holes filled) and landmarks (cubic, >= 0.5, largest blob) on it
    ─► per landmark a cut: the annulus mask itself; for the others the plane through the landmark's centre,
       normal to its flattest direction, intersected with the artery (the blob nearest the centre)
    ─► each cut rotated into the axial plane of a box 1.4 x the largest cut's span, the slice through its
       centre with holes filled: area (cm2) and both diameters (cm, one decimal), ends in mm and in voxels

A landmark that is absent (or whose plane misses the artery) is "not in image", as upstream reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tsrt.reports import pulmonary_geometry as geometry
from tsrt.reports.common import require_structures
from tsrt.totalseg import ops

REPORT = "pulmonary"
#: Landmark number -> (mask name, name shown in the report).
LANDMARKS: dict[int, tuple[str, str]] = {
    1: ("pul_annulus", "proximal MPA"),
    2: ("pul_sinotubular_junction", "sinotub. junc."),
    3: ("pul_bifurcation", "bifurcation"),
    4: ("pul_left_start", "left PA"),
    5: ("pul_right_start", "right PA"),
}
ARTERY = "pulmonary_artery"
#: Voxel size (mm) the models and the measurements work at, and the margin (mm) of the crops.
SPACING_MM = 0.8
MARGIN_MM = (20, 20, 20)
#: The box a cut is rotated in is this many times the largest cut's span.
BOX_FACTOR = 1.4
#: Below this annulus volume (mm3) upstream warns that the annulus is empty.
MIN_ANNULUS_MM3 = 200


@dataclass
class Volume:
    """Voxels and their voxel -> mm affine (what a NIfTI file holds)."""

    data: np.ndarray
    affine: np.ndarray


@dataclass
class ReportMasks:
    """What the models give: the CT they ran on and the artery and landmark masks on its grid."""

    ct: Volume
    artery: Volume
    landmarks: dict[str, Volume]  # by mask name; all five, empty ones included
    #: Per axis, whether the first / last slice is the scan's own edge (a mask touching it is cut).
    fov_edges: tuple[tuple[bool, bool], ...] = ((True, True),) * 3


@dataclass
class LandmarkMeasurement:
    """One landmark's cut and what was measured on it (None where upstream writes null)."""

    index: int
    name: str
    display_name: str
    present: bool
    centre: tuple[int, int, int] | None = None
    cut: np.ndarray | None = None  # on the measuring grid, uint8
    area: float | None = None  # cm2
    diameter: float | None = None  # cm
    diameter_pd: float | None = None  # cm
    ends_mm: list[list[float]] | None = None  # start, end, start_pd, end_pd
    ends_voxel: list[list[int]] | None = None
    slice_ct: np.ndarray | None = None  # the rotated slice, for the picture
    slice_mask: np.ndarray | None = None

    def as_json(self) -> dict[str, Any]:
        """Upstream's landmark entry: its keys in its order."""
        entry: dict[str, Any] = {"name": self.display_name}
        if not self.present and self.centre is not None:
            entry["cl_point"] = [int(v) for v in self.centre]  # upstream leaves it (and the empty cut) in
        entry.update(area=self.area, diameter=self.diameter, diameter_pd=self.diameter_pd)
        ends = self.ends_mm if self.ends_mm is not None else [None] * 4
        entry.update(zip(("start", "end", "start_pd", "end_pd"), ends))
        if self.present:
            voxels = self.ends_voxel if self.ends_voxel is not None else [None] * 4
            entry.update(zip(("start_voxel", "end_voxel", "start_pd_voxel", "end_pd_voxel"), voxels))
        return entry


@dataclass
class PulmonaryMeasurement:
    """The measured landmarks, the artery on the measuring grid and the report's JSON document."""

    landmarks: dict[int, LandmarkMeasurement]
    artery: np.ndarray  # uint8 on the measuring grid
    spacing: tuple[float, float, float]
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        """pulmonary_report.json as TotalSegmentator writes it (landmark numbers as keys)."""
        return {
            "landmarks": {str(i): self.landmarks[i].as_json() for i in sorted(self.landmarks)},
            "metadata": self.metadata,
        }


# --------------------------------------------------------------------------------------------- measuring


def measuring_grid(annulus: Volume, artery: Volume) -> tuple[tuple[int, int, int], np.ndarray, float]:
    """Shape and affine every mask is measured on, and the annulus volume (mm3) on it.

    The annulus mask's grid in closest-RAS orientation, cropped to the artery's largest blob + 20 mm,
    at 0.8 mm (nearest neighbour).
    """
    annulus_data, annulus_affine = ops.as_closest_canonical(annulus.data, annulus.affine)
    artery_data, artery_affine = ops.as_closest_canonical(artery.data, artery.affine)
    largest = ops.keep_largest_blob(np.asarray(artery_data, dtype=np.float32))
    crop_mask = (np.asarray(largest) > 0.5).astype(np.uint8)
    if crop_mask.shape != annulus_data.shape or not np.allclose(artery_affine, annulus_affine):
        crop_mask = geometry.resample_from_to(crop_mask, artery_affine, annulus_data.shape, annulus_affine, 0)
    cropped, cropped_affine, _ = ops.crop_to_mask(
        annulus_data, annulus_affine, ops.nifti_zooms(annulus_affine), crop_mask, MARGIN_MM, dtype=np.uint8
    )
    data, affine = ops.change_spacing(cropped, cropped_affine, ops.nifti_zooms(cropped_affine), SPACING_MM, order=0)
    volume = float(np.asarray(data, dtype=np.float32).sum() * np.prod(ops.nifti_zooms(affine)))
    return tuple(int(n) for n in data.shape), np.asarray(affine, dtype=np.float64), volume


def _on_grid(volume: Volume, shape: tuple[int, int, int], affine: np.ndarray, order: int) -> np.ndarray:
    """A mask resampled onto the measuring grid: above one half, largest blob, uint8 (upstream's lazy_load)."""
    values = geometry.resample_from_to(np.asarray(volume.data), volume.affine, shape, affine, order)
    return np.asarray(ops.keep_largest_blob(values.astype(np.float32) > 0.5), dtype=np.uint8)


def measure(masks: ReportMasks, metadata: dict[str, Any]) -> PulmonaryMeasurement:
    """All five landmarks from the models' masks, as `create_pulmonary_report` measures them."""
    warnings: list[str] = []
    shape, affine, annulus_mm3 = measuring_grid(masks.landmarks[LANDMARKS[1][0]], masks.artery)
    if annulus_mm3 < MIN_ANNULUS_MM3:
        warnings.append("WARNING: Annulus is empty!")
    spacing = ops.nifti_zooms(affine)
    ct = geometry.resample_from_to(np.asarray(masks.ct.data), masks.ct.affine, shape, affine, 3).astype(np.float32)
    artery = geometry.fill_holes(_on_grid(masks.artery, shape, affine, 0))
    landmarks: dict[int, LandmarkMeasurement] = {}
    for index, (name, display_name) in LANDMARKS.items():
        data = _on_grid(masks.landmarks[name], shape, affine, 3)
        if not data.any():
            warnings.append(f"WARNING: {name} is empty!")
        landmarks[index] = LandmarkMeasurement(index, name, display_name, bool(data.any()))
        landmarks[index].cut = data

    # the cuts, and the largest span among them (it sizes the box each cut is rotated in)
    largest_span = 0.0
    for index, landmark in landmarks.items():
        if not landmark.present:
            landmark.cut = None
            continue
        own = landmark.cut
        landmark.centre = tuple(int(v) for v in geometry.find_center(own, True))
        cut = own if index == 1 else geometry.plane_intersection(artery, landmark.centre, geometry.mask_normal(own))
        landmark.cut = np.asarray(cut, dtype=np.uint8)
        if not landmark.cut.any():
            warnings.append(f"WARNING: for landmark {index} no pulmonary artery plane was found!")
            landmark.present = False
            continue
        previous = landmarks.get(index - 1)
        if index > 1 and previous is not None and previous.present and np.logical_and(landmark.cut, previous.cut).any():
            warnings.append(f"WARNING: plane of landmark {index} touches previous landmark!")
        span = geometry.region_diameter(landmark.cut)
        if span is None:
            warnings.append(f"WARNING: for landmark {index} no diameter was found!")
            continue
        largest_span = max(largest_span, geometry.distance_mm(span[1], span[2], spacing))

    for landmark in landmarks.values():
        if landmark.present:
            _measure_cut(landmark, ct, affine, largest_span * BOX_FACTOR)
    return PulmonaryMeasurement(landmarks, artery, spacing, metadata, warnings)


def _measure_cut(landmark: LandmarkMeasurement, ct: np.ndarray, affine: np.ndarray, box_mm: float) -> None:
    """Area and diameters of one cut, rotated into the axial plane (upstream's measure_landmarks)."""
    slab = geometry.rotate_into_axial(landmark.cut, ct, affine, box_mm)
    plane = slab.plane.astype(np.uint8)
    z = int(geometry.find_center(plane, True)[2])
    section = geometry.fill_holes(plane[:, :, z])
    pixel = np.asarray(ops.nifti_zooms(slab.affine))[:2]
    landmark.area = float((section.sum() * np.prod(pixel) / 100).round(1))
    landmark.slice_ct, landmark.slice_mask = slab.ct[:, :, z], section
    diameters = geometry.slice_diameters(section, pixel)
    if diameters is None:
        landmark.diameter = landmark.diameter_pd = 0.0
        return
    landmark.diameter = float(np.round(diameters.diameter_mm / 10, 1))
    landmark.diameter_pd = float(np.round(diameters.perpendicular_mm / 10, 1))
    ends = (diameters.start, diameters.end, diameters.start_perpendicular, diameters.end_perpendicular)
    landmark.ends_voxel = [[int(v) for v in point] + [z] for point in ends]
    to_world = slab.to_world
    landmark.ends_mm = [(to_world[:3, :3] @ point + to_world[:3, 3]).round(4).tolist() for point in landmark.ends_voxel]


def check_masks(masks: ReportMasks) -> None:
    """Refuse (one line) when the artery or every landmark is missing, or the field of view cuts a landmark."""
    present = {name: volume.data for name, volume in masks.landmarks.items() if np.any(volume.data)}
    require_structures(REPORT, {ARTERY: masks.artery.data}, [ARTERY])
    if not present:
        require_structures(REPORT, present, [name for name, _ in LANDMARKS.values()])
    padding = [(0 if low else 1, 0 if high else 1) for low, high in masks.fov_edges]
    at_edges = {name: np.pad(np.asarray(data) > 0, padding) for name, data in present.items()}
    require_structures(REPORT, at_edges, [], whole=[name for name, _ in LANDMARKS.values() if name in present])
