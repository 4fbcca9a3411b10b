"""Diameters, areas, lengths and volumes of the aorta, as TotalSegmentator's aorta report measures them.

Why these numbers (aorta_report/measurements.py): at each landmark the cross-section is cut, turned
into a plane and measured in that plane (area in cm², largest diameter and the one perpendicular to
it in cm, for the whole lumen and for true and false lumen of a dissection). Between landmarks, each
section gets its length along the centerline, its widest diameter and its volume. Units and rounding
are upstream's (cm and cm² to 0.1, ml to 0.1), and so are its float32 lengths, visible in the JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tsrt.reports import aorta_centerline as cl
from tsrt.reports.aorta_geometry import (
    PlaneCut,
    Volume,
    cross_section,
    fill_closed,
    first_region_diameter_mm,
    keep_closest_blob,
    local_cross_section,
    mask_normal,
    slice_chords,
    turn_into_z_plane,
)
from tsrt.reports.aorta_landmarks import Landmark, widest_section
from tsrt.reports.pulmonary_geometry import box_around, find_center
from tsrt.totalseg import ops

log = logging.getLogger("tsrt")

SECTION_LANDMARKS = {
    "aorta_ascending": (1, 5), "aorta_arch": (5, 7), "aorta_descending": (7, 9), "aorta_abdominal": (9, 11),
    "aorta_total": (1, 11),
}
#: Crops around a cross-section are this many times the largest landmark diameter.
CROP_FACTOR = 1.4
#: Keys of a landmark nobody could measure (all None), in upstream's order.
EMPTY_LANDMARK_KEYS = (
    "area", "area_fl", "area_tl", "diameter", "diameter_fl", "diameter_tl", "diameter_pd", "diameter_fl_pd",
    "diameter_tl_pd", "start", "end", "start_pd", "end_pd",
)
EMPTY_SECTION_KEYS = (
    "length", "max_diameter", "max_diameter_perpendicular", "volume", "volume_true_lumen", "volume_false_lumen",
)


def cut_landmarks(
    landmarks: dict[int, Landmark], centerline: np.ndarray, aorta: np.ndarray, annulus: np.ndarray, spacing,
    erosion: bool = False,
) -> float:
    """Cut every placed landmark's cross-section; returns the largest first-pass diameter (mm).

    The annulus is cut along its own plane (its PCA normal), everything else normal to the centerline.
    `erosion` shrinks the masks by one voxel first (upstream's --erosion, for masks that run wide).
    """
    for number, landmark in landmarks.items():
        if landmark.empty:
            landmark.diameter_mm = 0
            continue
        point = centerline[landmark.index]
        if landmark.number == 1:
            source = annulus.astype(np.uint8)
            roi = cross_section(source, point, mask_normal(source)).astype(np.uint8)
            if erosion:
                roi = ops.binary_erosion_cross(roi, 1).astype(np.uint8)
        else:
            source = ops.binary_erosion_cross(aorta, 1) if erosion else aorta
            roi = cross_section(source, point, cl.normal_at(centerline, landmark.index)).astype(np.uint8)
        landmark.point, landmark.roi = point, roi
        diameter = first_region_diameter_mm(roi, spacing)
        if diameter is None:
            log.info("No diameter found at landmark %d.", number)
        landmark.diameter_mm = 0 if diameter is None else diameter
    return max(landmark.diameter_mm for landmark in landmarks.values())


def measure_landmarks(
    landmarks: dict[int, Landmark], affine: np.ndarray, true_lumen: np.ndarray, false_lumen: np.ndarray,
    max_diameter: float, ct: np.ndarray | None = None,
) -> None:
    """Area and diameters at each landmark, in the plane of its cross-section (upstream's measure_landmarks).

    `ct` (on the report grid) is only needed for the pictures; the numbers come from the masks.
    """
    for landmark in landmarks.values():
        if landmark.empty:
            landmark.values = dict.fromkeys(EMPTY_LANDMARK_KEYS)
            continue
        roi = landmark.roi
        cut = turn_into_z_plane(
            roi, affine, max_diameter * CROP_FACTOR, ct=ct,
            masks=(np.logical_and(roi, false_lumen).astype(np.uint8), np.logical_and(roi, true_lumen).astype(np.uint8)),
        )
        landmark.values, landmark.picture = measure_cut(cut)


def measure_cut(cut: PlaneCut) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON values of one turned cross-section, and what its picture needs (slices and chord ends)."""
    plane = cut.plane.get_fdata().astype(np.uint8)
    false_volume, true_volume = (mask.get_fdata().astype(np.uint8) for mask in cut.masks)
    center = find_center(plane, True)
    z = plane.shape[2] // 2 if center is None else int(center[2])
    whole, false, true = (fill_closed(volume[:, :, z]) for volume in (plane, false_volume, true_volume))
    spacing = np.asarray(cut.plane.header.get_zooms())[:2]
    values: dict[str, Any] = {}
    for key, data in (("area", whole), ("area_fl", false), ("area_tl", true)):
        values[key] = (data.sum() * np.prod(spacing) / 100).round(1)
    diameter, perpendicular, ends, ends_mm = slice_chords(whole, spacing, cut.to_world, z=z)
    values["diameter"] = (diameter / 10).round(1)
    values["diameter_pd"] = (perpendicular / 10).round(1)
    values["start"], values["end"], values["start_pd"], values["end_pd"] = ends_mm or [None] * 4
    values["start_voxel"], values["end_voxel"], values["start_pd_voxel"], values["end_pd_voxel"] = ends or [None] * 4
    for suffix, data in (("fl", false), ("tl", true)):
        lumen_diameter, lumen_perpendicular, _, _ = slice_chords(data, spacing, cut.to_world)
        values[f"diameter_{suffix}"] = (lumen_diameter / 10).round(1)
        values[f"diameter_{suffix}_pd"] = (lumen_perpendicular / 10).round(1)
    picture = {
        "ct": None if cut.ct is None else cut.ct.get_fdata()[:, :, z],
        "mask": whole, "false_lumen": false, "spacing": spacing, "ends": ends,
    }
    return values, picture


def aorta_section(aorta: Volume, start: int, end: int, centerline: np.ndarray, crop_mm: float) -> np.ndarray:
    """The aorta between two centerline indices: both cross-sections removed, the blob around the middle kept."""
    mask = np.asarray(aorta.data).astype(np.uint8)
    if len(centerline) < 2 or not (0 <= start < len(centerline) and 0 <= end < len(centerline)):
        log.info("Centerline section too short to cut out an aorta section.")
        return np.zeros_like(mask)
    if end < start:
        start, end = end, start
    for index in (start, end):
        crop, cut = local_cross_section(aorta, centerline[index], cl.normal_at(centerline, index), crop_mm)
        origin = np.rint(aorta.voxel_of((0, 0, 0), crop)).astype(int)
        box = tuple(slice(origin[axis], origin[axis] + cut.shape[axis]) for axis in range(3))
        mask[box][cut > 0] = 0
    middle = centerline[cl.midpoint_index(centerline, start, end)]
    return keep_closest_blob(mask, middle)


def measure_sections(
    landmarks: dict[int, Landmark], aorta: Volume, aorta_filled: np.ndarray, true_lumen: np.ndarray,
    false_lumen: np.ndarray, centerline: np.ndarray, spacing, max_diameter: float,
) -> dict[str, dict[str, Any]]:
    """Length (cm), widest diameter (cm) and volumes (ml) of each aorta section between two landmarks."""
    stats: dict[str, dict[str, Any]] = {}
    crop_mm = max_diameter * CROP_FACTOR
    for name, (first, last) in SECTION_LANDMARKS.items():
        start, end = landmarks[first], landmarks[last]
        if start.empty or end.empty:
            log.info("Section %s cannot be measured: one of its landmarks is missing.", name)
            stats[name] = dict.fromkeys(EMPTY_SECTION_KEYS)
            continue
        section_line = centerline[end.index : start.index]
        widest, index = widest_section(aorta, section_line, crop_mm)
        widest_mm = np.float32(0)
        if index is not None:
            _, cut = local_cross_section(aorta, section_line[index], cl.normal_at(section_line, index), crop_mm)
            found = first_region_diameter_mm(cut, spacing)
            widest_mm = np.float32(0 if found is None else found)
        if widest_mm > max_diameter:
            log.info("Section %s is wider (%.2f mm) than any landmark (%.2f mm).", name, widest_mm, max_diameter)
        if name == "aorta_total":
            section = aorta_filled
        else:
            section = aorta_section(aorta, start.index, max(0, end.index - 2), centerline, crop_mm).astype(np.float64)
        stats[name] = {
            "length": (cl.path_length_mm(section_line, spacing) / 10).round(1),
            "max_diameter": round(float(widest_mm) / 10, 1),
            **{key: (part.sum() * np.prod(spacing) / 1000).round(1) for key, part in (
                ("volume", section), ("volume_true_lumen", section * true_lumen),
                ("volume_false_lumen", section * false_lumen),
            )},
        }
    return stats


@dataclass
class DiameterProfile:
    """Diameters (mm) along the aorta, measured on the original masks every few mm (upstream's diameter_profiles).

    `position_mm` counts from the annulus end (0) down to the distal end; NaN where a mask has no cut.
    """

    position_mm: np.ndarray
    aorta_mm: np.ndarray
    true_lumen_mm: np.ndarray
    false_lumen_mm: np.ndarray


def diameter_profile(
    masks: list[np.ndarray], centerline: np.ndarray, spacing, crop_mm: float, subsample: int = 5,
    target_points: int = 70,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Diameter of each mask's cross-section at every `stride`-th point of an evenly resampled centerline."""
    if not len(centerline):
        return np.empty(0), [np.empty(0) for _ in masks]
    radius = np.maximum(1, (np.asarray([crop_mm] * 3) / 2 / np.asarray(spacing)).astype(int))
    stride = max(subsample, int(np.ceil(len(centerline) / max(target_points, 1))))
    indices = list(range(0, len(centerline), stride))
    if indices[-1] != len(centerline) - 1:
        indices.append(len(centerline) - 1)
    cumulative = cl.arc_lengths(centerline, spacing)
    result = [np.full(len(indices), np.nan) for _ in masks]
    usable = [np.count_nonzero(mask) >= 5 for mask in masks]
    for slot, index in enumerate(indices):
        point = centerline[index]
        box = box_around(point, radius, masks[0].shape)
        local_point = point - np.asarray([axis[0] for axis in box])
        normal = cl.normal_at(centerline, index)
        for which, mask in enumerate(masks):
            if not usable[which]:
                continue
            local = mask[box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]].astype(np.uint8)
            found = first_region_diameter_mm(cross_section(local, local_point, normal), spacing)
            if found is not None:
                result[which][slot] = found
    return cumulative[-1] - cumulative[indices], result


@dataclass
class ReportGrid:
    """Everything the measurements read, on the report grid (canonical, 0.8 mm, aorta + 20 mm)."""

    affine: np.ndarray
    spacing: tuple
    annulus: np.ndarray
    annulus_volume: float
    aorta: np.ndarray  # lumen masks merged in
    aorta_filled: np.ndarray  # the total model's aorta, holes filled (the whole aorta's volume)
    true_lumen: np.ndarray
    false_lumen: np.ndarray
    structures: dict[str, np.ndarray]
    vessels: np.ndarray
    reference: Any  # the grid as a nibabel image (CT and extra masks are resampled onto it)


@dataclass
class Centerline:
    points: np.ndarray  # voxel coordinates on the report grid, distal end first, annulus centre last
    image: np.ndarray  # its voxels (uint8), for pictures
    resampled: np.ndarray  # every 1 mm (world), for the diameter profile


@dataclass
class AortaReport:
    """The measured report: upstream's JSON, plus what pictures, profile and CPR are drawn from."""

    json: dict[str, Any]
    landmarks: dict[int, Landmark]
    sections: dict[str, dict[str, Any]]
    grid: ReportGrid
    centerline: Centerline
    max_diameter_mm: float
    profile: DiameterProfile | None = None
    ct: np.ndarray | None = None  # CT on the report grid (pictures, CPR)
    seconds: dict[str, float] = field(default_factory=dict)


def report_json(
    landmarks: dict[int, Landmark], sections: dict[str, dict[str, Any]], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The report as upstream's JSON holds it: landmarks by number (name first), section stats, metadata.

    numpy scalars and arrays become Python numbers and lists as upstream's convert_to_serializable
    makes them (a float32 length of 12.3 shows as 12.300000190734863, as in upstream's files).
    """
    document = {
        "landmarks": {
            number: {"name": landmark.name, **landmark.values} for number, landmark in sorted(landmarks.items())
        },
        "section_stats": sections,
        "metadata": metadata,
    }
    return serializable(document)


def serializable(value: Any) -> Any:
    """numpy values as JSON-ready Python values (int keys stay ints; json writes them as strings)."""
    if isinstance(value, dict):
        return {key: serializable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [serializable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def landmark_distance_mm(centerline: np.ndarray, spacing, index: int) -> float:
    """How far a centerline index lies from the annulus end, in mm (for plots and the profile)."""
    lengths = cl.arc_lengths(centerline, spacing)
    return float(lengths[-1] - lengths[index])


__all__ = [
    "AortaReport", "Centerline", "DiameterProfile", "ReportGrid", "SECTION_LANDMARKS", "cut_landmarks",
    "diameter_profile", "measure_landmarks", "measure_sections", "report_json",
]
