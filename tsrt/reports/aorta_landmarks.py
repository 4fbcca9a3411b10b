"""The eleven measuring positions along the aorta, placed as TotalSegmentator's aorta report places them.

Why: diameters are compared between patients at anatomical positions, not at centerline indices.
Each position hangs off a structure the models segment (aorta_report/landmarks.py):

    annulus (1) ─ sinuses of Valsalva (2, widest section between 1 and 3) ─ sinotubular junction (3)
    ─ mid ascending (4) ─ 5 mm past the brachiocephalic trunk (5) ─ mid arch (6)
    ─ 5 mm before the left subclavian artery (7) ─ mid descending (8) ─ T12 (9)
    ─ celiac trunk (10) ─ 20 mm above the distal end (11, when the right iliac artery is there)

A position whose structure is missing (or does not touch the aorta) is empty: "not in image".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tsrt.reports import aorta_centerline as cl
from tsrt.reports.aorta_geometry import Volume, local_cross_section, most_distant_points
from tsrt.reports.pulmonary_geometry import find_center
from tsrt.totalseg import ops

log = logging.getLogger("tsrt")

#: Report key -> (mask name, which model run gives it). "details": the aorta-specific tasks.
STRUCTURES = {
    "brachio": ("brachiocephalic_trunk", "totalseg"),
    "subclavian": ("subclavian_artery_left", "totalseg"),
    "celiac": ("celiac_trunk", "totalseg"),
    "T12": ("vertebrae_T12", "totalseg"),
    "sinotub_junc": ("sinotubular_junction", "details"),
    "iliac": ("iliac_artery_right", "totalseg"),
}
#: Structures that anchor by their own volume (>= 200 mm³), not by touching the aorta.
ANCHOR_BY_VOLUME = ("T12", "sinotub_junc", "iliac")
MIN_ANCHOR_VOLUME_MM3 = 200
LANDMARK_DEPENDENCIES = {
    1: ("annulus",), 2: ("annulus", "sinotub_junc"), 3: ("sinotub_junc",), 4: ("sinotub_junc", "brachio"),
    5: ("brachio",), 6: ("brachio", "subclavian"), 7: ("subclavian",), 8: ("subclavian", "T12"), 9: ("T12",),
    10: ("celiac",), 11: ("iliac",),
}
LANDMARK_NAMES = {
    1: "annulus", 2: "sinuses of valsalva", 3: "sinotub. junc.", 4: "mid asc. aorta", 5: "distal asc. aorta",
    6: "mid aortic arch", 7: "proximal desc. aorta", 8: "mid desc. aorta", 9: "desc. aorta (T12)",
    10: "abd. aorta (celiac artery)", 11: "abd. aorta (bifurcation)",
}
#: Sinus search: from 10 mm past the junction to 10 mm before the annulus, in crops of 80 mm.
SINUS_MARGIN_MM, SINUS_CROP_MM = 10, 80


@dataclass
class Structure:
    """A structure a landmark hangs off, with where it meets the centerline."""

    mask: np.ndarray
    empty: bool = False
    touching: np.ndarray | None = None  # the part that anchors it (its contact with the aorta, or itself)
    endpoint: tuple | None = None
    index: int | None = None


@dataclass
class Landmark:
    number: int
    depends_on: list[str]
    empty: bool
    index: int | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the measurements, in upstream's JSON key order
    point: np.ndarray | None = None
    roi: np.ndarray | None = None  # its cross-section (uint8 on the report grid)
    diameter_mm: float = 0.0  # first measure (3D cut), which sizes the crops of everything after
    picture: Any = None  # what the report draws for it (tsrt.reports.aorta_render)

    @property
    def name(self) -> str:
        return LANDMARK_NAMES[self.number]


def anchor_structures(
    masks: dict[str, np.ndarray], aorta: np.ndarray, centerline: np.ndarray, spacing
) -> dict[str, Structure]:
    """Where each structure meets the centerline (upstream's attach_structure_anchors)."""
    structures = {key: Structure(masks[key]) for key in STRUCTURES}
    for key, structure in structures.items():
        if key in ANCHOR_BY_VOLUME:
            big = structure.mask.sum() * np.prod(spacing) >= MIN_ANCHOR_VOLUME_MM3
            structure.touching = structure.mask if big else np.zeros_like(structure.mask)
        else:
            structure.touching = (ops.binary_dilation_cross(structure.mask, 1) + aorta) > 1
        if not structure.touching.any():
            log.info("%s is (almost) empty or does not touch the aorta: its landmarks are left out.", key)
            structure.empty = True
    branches: dict[str, Any] = {"brachio": None, "subclavian": None}
    if structures["brachio"].empty or structures["subclavian"].empty:
        structures["brachio"].empty = structures["subclavian"].empty = True
    else:
        branches = dict(zip(branches, most_distant_points(
            structures["brachio"].touching, structures["subclavian"].touching
        )))
    for key, structure in structures.items():
        if structure.empty:
            continue
        if key in ("celiac", "iliac"):  # its highest voxel
            where = np.where(structure.touching > 0)
            top = np.argmax(where[2])
            structure.endpoint = tuple(where[axis][top] for axis in range(3))
        elif key in branches:  # the two branch vessels: their mutually farthest contact voxels
            structure.endpoint = tuple(branches[key])
        else:
            structure.endpoint = tuple(find_center(structure.touching, True))
        section = None
        if key == "sinotub_junc" and not structures["brachio"].empty:
            section = centerline[structures["brachio"].index :]
        elif key == "T12":
            section = cl.section_around(centerline, structure.endpoint, 40, spacing[2])
        structure.index = cl.closest_index(centerline, structure.endpoint, section)
        if structure.index is None:
            log.info("Could not place %s on the centerline: its landmarks are left out.", key)
            structure.empty = True
    return structures


def place_landmarks(
    structures: dict[str, Structure], annulus_volume: float, centerline: np.ndarray, aorta: Volume, spacing
) -> dict[int, Landmark]:
    """Centerline indices of the 11 landmarks (upstream's create_landmarks), empty where a structure is missing."""
    empty = {key: structure.empty for key, structure in structures.items()}
    empty["annulus"] = annulus_volume < MIN_ANCHOR_VOLUME_MM3
    landmarks = {
        number: Landmark(number, list(needs), any(empty[name] for name in needs))
        for number, needs in LANDMARK_DEPENDENCIES.items()
    }

    def place(number: int, index: int | None) -> None:
        landmark = landmarks[number]
        if landmark.empty:
            return
        if index is None:
            landmark.empty = True
            log.info("Could not place landmark %d on the centerline.", number)
        else:
            landmark.index = int(index)

    def placed(*numbers: int) -> bool:
        return all(not landmarks[number].empty for number in numbers)

    index_of = {key: structure.index for key, structure in structures.items()}
    place(11, cl.index_at_distance(centerline, 0, 20, spacing))
    place(10, index_of["celiac"])
    if not landmarks[9].empty:
        if not structures["celiac"].empty and index_of["T12"] < index_of["celiac"]:
            log.info("T12 lies below the celiac trunk: landmark 9 goes 10 mm above the celiac trunk.")
            place(9, cl.index_at_distance(centerline, index_of["celiac"], 10, spacing))
        else:
            place(9, index_of["T12"])
    place(7, cl.index_at_distance(centerline, index_of["subclavian"], -5, spacing))
    if placed(8, 7, 9):
        place(8, cl.midpoint_index(centerline, landmarks[7].index, landmarks[9].index))
    place(5, cl.index_at_distance(centerline, index_of["brachio"], 5, spacing))
    if placed(6, 5, 7):
        place(6, cl.midpoint_index(centerline, landmarks[5].index, landmarks[7].index))
    place(3, index_of["sinotub_junc"])
    if placed(4, 3, 5):
        place(4, cl.midpoint_index(centerline, landmarks[3].index, landmarks[5].index))
    place(1, len(centerline) - 1)
    if placed(2, 1, 3):
        start = cl.index_at_distance(centerline, landmarks[3].index, SINUS_MARGIN_MM, spacing)
        end = cl.index_at_distance(centerline, landmarks[1].index, -SINUS_MARGIN_MM, spacing)
        if start is not None and end is not None and start < end:
            widest = widest_section(aorta, centerline[start:end], SINUS_CROP_MM)[0]
            index = cl.index_of(centerline, widest)
            if index is None:
                index = cl.midpoint_index(centerline, landmarks[1].index, landmarks[3].index)
            place(2, index)
        else:
            log.info("Annulus and sinotubular junction are too close: the sinuses go halfway between them.")
            place(2, cl.midpoint_index(centerline, landmarks[1].index, landmarks[3].index))
    return landmarks


def widest_section(aorta: Volume, section: np.ndarray, crop_mm: float) -> tuple[np.ndarray | None, int | None]:
    """The point of a centerline section whose cross-section has the most voxels (first on ties), and its index.

    Normals come from the section itself (at its ends they differ from the whole centerline's), and
    repeated points count once, at their first position, as upstream's dictionary keeps them.
    """
    if len(section) < 2:
        log.info("Centerline section too short (%d points).", len(section))
        return None, None
    areas: dict[tuple, int] = {}
    for index, point in enumerate(section):
        _, cut = local_cross_section(aorta, point, cl.normal_at(section, index), crop_mm)
        areas[tuple(point)] = int(cut.sum())
    widest = max(areas, key=areas.get)
    return np.array(widest), cl.index_of(section, widest)
