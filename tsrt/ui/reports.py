"""The web page's Reports step: organ volumes and densities, the aorta's diameters, the Evans index.

Each report is tsrt's own - `tsrt.outputs.statistics` (TotalSegmentator's statistics.json), `tsrt.reports.aorta`
(`tsrt report aorta`) and `tsrt.companions.evans_index` (`tsrt evans-index`) - and writes the files those write,
into the result's session folder, for download. This module adds what only the page shows: the diameter
profile as a picture, with the measured landmarks on it.

The page never fetches a model (nothing leaves the machine): a report whose models are not installed is
refused in one line naming the command that installs them. Before any of a report's models run, the page's
own segmentation is asked first: when its model segments a structure the report cannot do without (the
aorta, the brain) and found it missing or cut by the scan's edge, the report is refused in one line at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.errors import TsrtError
from tsrt.outputs.font import GLYPH_HEIGHT, draw_text, text_width
from tsrt.outputs.preview import encode_png
from tsrt.outputs.statistics import structure_statistics, write_statistics
from tsrt.pipeline.write import atomic_output
from tsrt.reports.common import MissingStructuresError, require_structures
from tsrt.ui.results import STATUS_AT_EDGE, STATUS_COMPLETE, mean_column, report_csv
from tsrt.ui.runner import Segmentation

if TYPE_CHECKING:
    from tsrt.reports.aorta_measure import AortaReport, DiameterProfile
    from tsrt.totalseg.options import RuntimeOptions

VOLUMES, AORTA, EVANS = "volumes", "aorta", "evans"
#: Tab titles, in the page's order.
REPORT_TITLES = {VOLUMES: "Organ volumes and densities", AORTA: "Aorta diameters", EVANS: "Evans index"}
#: Structures a report cannot do without, checked on the page's segmentation when its model segments them.
REQUIRED_STRUCTURES: dict[str, tuple[str, ...]] = {AORTA: ("aorta",), EVANS: ("brain", "skull")}
#: What the refusals call each report ("The aorta report needs ...").
REPORT_NAMES = {VOLUMES: "volume", AORTA: "aorta", EVANS: "Evans index"}
REFERENCE_RANGES_NOTE = (
    "Reference ranges are not available: TotalSegmentator's web app compares each volume with a reference "
    "population, but neither that report's code nor its reference data is published (TotalSegmentator issue "
    "#451) or shipped in the totalsegmentator package. The volumes and mean densities are TotalSegmentator's "
    "statistics.json; a structure the scan's edge cuts is not measured (0 in the JSON), as there."
)
PHASE_ESTIMATE = "estimate from the scan (tsrt phase)"
STATUS_CUT_NOT_MEASURED = f"{STATUS_AT_EDGE}: not measured"


@dataclass(frozen=True)
class ReportFile:
    """One download: the button's text and the file in the session folder."""

    label: str
    path: Path
    mime: str


def scan_input(source: Any) -> Any:
    """What a report reads the scan from: its file (DICOM folder or zip) when it has one, else the image itself."""
    return source.path if source.path is not None else source.image


def report_runtime(provider: str, precision: str, models_dir: Path | None = None) -> RuntimeOptions:
    """The runtime the report models share with the page's segmentation, never fetching a model.

    int8 stays with the segmentation's model: its gated graphs are made per model (`tsrt models quantize`),
    so the report models run in fp32 then.
    """
    from tsrt.totalseg.options import RuntimeOptions

    precision = "fp32" if precision == "int8" else precision
    return RuntimeOptions(models_dir=models_dir, provider=provider, quiet=True, precision=precision, offline=True)


def refuse_what_the_segmentation_lacks(kind: str, segmentation: Segmentation) -> None:
    """One line (MissingStructuresError) when the page's segmentation shows the report cannot be made.

    Only structures the segmentation's model segments are asked about: a model that does not know the
    brain says nothing about it, and the report's own models decide.
    """
    from tsrt.reports.aorta import require_aorta_in_view

    by_name = {name: label for label, name in segmentation.label_names.items()}
    masks = {name: segmentation.labels == by_name[name] for name in REQUIRED_STRUCTURES.get(kind, ()) if name in by_name}
    if kind == AORTA and "aorta" in masks:
        require_aorta_in_view(masks["aorta"], segmentation.image.affine)
    elif masks:
        require_structures(REPORT_NAMES[kind], masks, list(masks))


# --------------------------------------------------------------------------------------------- volumes


@dataclass
class VolumeReport:
    """Volume and mean density per structure found, TotalSegmentator's statistics.json, and both as files."""

    table: dict[str, list]
    statistics: dict[str, dict[str, float]]
    files: list[ReportFile]

    @property
    def measured(self) -> int:
        return sum(status == STATUS_COMPLETE for status in self.table["status"])


def volume_report(segmentation: Segmentation, folder: Path, stem: str) -> VolumeReport:
    """Per structure the segmentation found: volume (ml) and mean HU (MR: intensity), by TotalSegmentator's rules.

    The JSON is the statistics.json `tsrt segment --statistics` writes for this segmentation (volume in mm³,
    mean intensity; 0 and 0 for a structure within 3 voxels of the scan's edge); the CSV is the table.
    """
    seg = segmentation
    statistics = structure_statistics(seg.labels, seg.values, seg.image.spacing, seg.label_names)
    present = {int(label) for label in np.unique(seg.labels)} - {0}
    mean_name = mean_column(seg.modality)
    table: dict[str, list] = {"structure": [], "volume (ml)": [], mean_name: [], "status": []}
    for label, name in seg.label_names.items():
        if label not in present:
            continue
        measured = statistics[name]["volume"] > 0
        table["structure"].append(name)
        table["volume (ml)"].append(round(statistics[name]["volume"] / 1000.0, 2) if measured else None)
        table[mean_name].append(round(statistics[name]["intensity"], 1) if measured else None)
        table["status"].append(STATUS_COMPLETE if measured else STATUS_CUT_NOT_MEASURED)
    if STATUS_COMPLETE not in table["status"]:
        raise MissingStructuresError(
            "The volume report needs at least one structure the scan shows whole, and the segmentation found "
            f"{'none' if not present else 'only structures the edge of the scan cuts'} (nothing was measured)."
        )
    json_path = write_statistics(statistics, Path(folder) / f"{stem}_statistics.json")
    csv_path = Path(folder) / f"{stem}_volumes.csv"
    with atomic_output(csv_path) as temp:
        temp.write_bytes(report_csv(table))
    files = [
        ReportFile("Volume report (JSON, statistics.json)", json_path, "application/json"),
        ReportFile("Volume report (CSV)", csv_path, "text/csv"),
    ]
    return VolumeReport(table, statistics, files)


# --------------------------------------------------------------------------------------------- aorta


@dataclass(frozen=True)
class ProfilePoint:
    """A measured landmark on the diameter profile: its distance from the annulus and its diameter."""

    number: int
    name: str
    position_mm: float
    diameter_mm: float
    diameter_pd_mm: float  # the perpendicular diameter


@dataclass
class AortaPageReport:
    json: dict[str, Any]
    points: list[ProfilePoint]
    profile_png: bytes
    landmark_pictures: list[tuple[np.ndarray, str]]  # the cut at each measured landmark, with its caption
    page: Path
    files: list[ReportFile] = field(default_factory=list)


def aorta_phase_choices() -> list[str]:
    """The contrast phase menu: estimated from the scan first, then the phases by name."""
    from tsrt.companions.phase import PHASE_BANDS

    return [PHASE_ESTIMATE, *dict.fromkeys(phase for _, phase, _ in PHASE_BANDS)]


def aorta_phase(choice: str, runtime: RuntimeOptions) -> Any:
    """A named phase as given, or tsrt's phase classifier (its classifiers checked now, before any model runs)."""
    if choice != PHASE_ESTIMATE:
        return choice
    from tsrt.companions.phase import PhaseEstimator

    try:
        estimator = PhaseEstimator(runtime)
    except TsrtError as error:
        raise type(error)(f"{str(error).rstrip('.')}; or choose the contrast phase by name.") from None
    return lambda image: estimator.predict(image)["phase"]


def measured_landmarks(report: AortaReport) -> list[ProfilePoint]:
    """Every landmark the report measured, placed along the centerline as the diameter profile counts (mm from the annulus)."""
    from tsrt.reports.aorta_measure import landmark_distance_mm

    points = []
    for number, landmark in sorted(report.landmarks.items()):
        diameter = landmark.values.get("diameter")
        if landmark.empty or landmark.index is None or not diameter:
            continue
        position = landmark_distance_mm(report.centerline.points, report.grid.spacing, landmark.index)
        perpendicular = landmark.values.get("diameter_pd") or 0.0
        points.append(ProfilePoint(number, landmark.name, position, float(diameter) * 10, float(perpendicular) * 10))
    return points


def aorta_report_for_page(
    source: Any, segmentation: Segmentation, runtime: RuntimeOptions, phase_choice: str, folder: Path, stem: str
) -> AortaPageReport:
    """`tsrt report aorta` on the page's scan (its models, offline), then its files and pictures for the page."""
    from tsrt.reports.aorta import AortaReporter

    refuse_what_the_segmentation_lacks(AORTA, segmentation)
    phase = aorta_phase(phase_choice, runtime)
    report = AortaReporter(runtime, contrast_phase=phase).report(scan_input(source))
    return aorta_page_report(report, folder, stem)


def aorta_page_report(report: AortaReport, folder: Path, stem: str) -> AortaPageReport:
    """The measured report's files as `tsrt report aorta` writes them (JSON, page PNG, profile CSV), the
    diameter profile picture, and the cut at each measured landmark for the page."""
    from tsrt.reports.aorta import aorta_output_files, write_outputs
    from tsrt.reports.aorta_render import landmark_picture

    outputs = aorta_output_files(Path(folder) / f"{stem}_aorta_report.json")
    write_outputs(report, outputs)
    points = measured_landmarks(report)
    profile_png = encode_png(render_diameter_profile(report.profile, points))
    plot_path = Path(folder) / f"{stem}_aorta_profile.png"
    with atomic_output(plot_path) as temp:
        temp.write_bytes(profile_png)
    pictures = [
        (landmark_picture(report.landmarks[point.number], 200),
         f"{point.number} - {point.name}: {point.diameter_mm / 10:.1f} x {point.diameter_pd_mm / 10:.1f} cm")
        for point in points if report.landmarks[point.number].picture is not None
    ]
    assert outputs.json is not None and outputs.picture is not None and outputs.profile is not None
    files = [
        ReportFile("Aorta report (JSON)", outputs.json, "application/json"),
        ReportFile("Report page (PNG)", outputs.picture, "image/png"),
        ReportFile("Diameter profile (CSV)", outputs.profile, "text/csv"),
        ReportFile("Diameter profile (PNG)", plot_path, "image/png"),
    ]
    return AortaPageReport(report.json, points, profile_png, pictures, outputs.picture, files)


# --------------------------------------------------------------------------------------------- profile picture

PLOT_WIDTH, PLOT_HEIGHT = 1000, 470
PLOT_MARGINS = (60, 30, 60, 80)  # top, right, bottom, left (pixels)
TEXT, AXIS, GRID = (255, 255, 255), (160, 160, 160), (48, 48, 48)
MARKER_RADIUS = 6


@dataclass(frozen=True)
class PlotFrame:
    """Where millimetres land on the picture: position along the centerline across, diameter up (0 at the axis)."""

    top: int
    right: int
    bottom: int
    left: int
    length_mm: float
    diameter_mm: float

    def pixel(self, position_mm: float, diameter_mm: float) -> tuple[int, int]:
        """(row, column) of a point of the profile."""
        column = self.left + position_mm / self.length_mm * (self.right - self.left)
        row = self.bottom - diameter_mm / self.diameter_mm * (self.bottom - self.top)
        return int(round(row)), int(round(column))


def tick_step(span: float, most: int = 10) -> float:
    """The smallest of 1, 2, 5 x 10^k that divides `span` into at most `most` steps."""
    magnitude = 10.0 ** np.floor(np.log10(max(span, 1e-9) / most))
    for factor in (1, 2, 5, 10):
        if span / (factor * magnitude) <= most:
            return factor * magnitude
    return 10 * magnitude


def profile_frame(profile: DiameterProfile | None, points: Sequence[ProfilePoint]) -> PlotFrame:
    """Axes that hold the whole profile and every landmark, rounded up to a tick."""
    positions = [p.position_mm for p in points]
    diameters = [p.diameter_mm for p in points]
    if profile is not None and len(profile.position_mm):
        positions.append(float(np.nanmax(profile.position_mm)))
        for curve in (profile.aorta_mm, profile.true_lumen_mm, profile.false_lumen_mm):
            if np.isfinite(curve).any():
                diameters.append(float(np.nanmax(curve)))
    length = max([10.0, *positions])
    diameter = max([10.0, *diameters]) * 1.15
    length = float(np.ceil(length / tick_step(length)) * tick_step(length))
    diameter = float(np.ceil(diameter / tick_step(diameter, 6)) * tick_step(diameter, 6))
    top, right, bottom, left = PLOT_MARGINS
    return PlotFrame(top, PLOT_WIDTH - right, PLOT_HEIGHT - bottom, left, length, diameter)


def landmark_colour(number: int) -> tuple[int, int, int]:
    """The landmark's colour on the report page (upstream's plotting colours)."""
    from tsrt.reports.aorta_render import LANDMARK_COLOURS

    red, green, blue = LANDMARK_COLOURS[(number - 1) % len(LANDMARK_COLOURS)]
    return int(round(red * 255)), int(round(green * 255)), int(round(blue * 255))


def render_diameter_profile(profile: DiameterProfile | None, points: Sequence[ProfilePoint]) -> np.ndarray:
    """Diameter (mm, up) against distance from the aortic annulus along the centerline (mm, across), RGB uint8.

    The aorta's curve (and the true and false lumen's, when the report found a false lumen), and each
    measured landmark as a disc in its report colour at its position and diameter, numbered as on the page.
    """
    from tsrt.reports.aorta_cpr import CURVES
    from tsrt.reports.pulmonary_render import draw_line

    frame = profile_frame(profile, points)
    canvas = np.zeros((PLOT_HEIGHT, PLOT_WIDTH, 3), dtype=np.uint8)
    title = "Aorta diameter profile"
    draw_text(canvas, title, 12, (PLOT_WIDTH - text_width(title, 2)) // 2, TEXT, 2)
    draw_text(canvas, "diameter (mm)", frame.top - GLYPH_HEIGHT - 12, 8, TEXT, 1)
    x_title = "distance from the aortic annulus along the centerline (mm)"
    draw_text(canvas, x_title, PLOT_HEIGHT - 26, frame.left + (frame.right - frame.left - text_width(x_title, 1)) // 2,
              TEXT, 1)
    step = tick_step(frame.length_mm)
    for tick in np.arange(0.0, frame.length_mm + step / 2, step):
        row, column = frame.pixel(tick, 0)
        canvas[frame.top : frame.bottom, column] = GRID
        canvas[frame.bottom : frame.bottom + 5, column] = AXIS
        label = f"{tick:g}"
        draw_text(canvas, label, frame.bottom + 9, column - text_width(label, 1) // 2, AXIS, 1)
    step = tick_step(frame.diameter_mm, 6)
    for tick in np.arange(0.0, frame.diameter_mm + step / 2, step):
        row, column = frame.pixel(0, tick)
        canvas[row, frame.left : frame.right] = GRID
        canvas[row, frame.left - 5 : frame.left] = AXIS
        label = f"{tick:g}"
        draw_text(canvas, label, row - GLYPH_HEIGHT // 2, frame.left - 9 - text_width(label, 1), AXIS, 1)
    canvas[frame.top : frame.bottom + 1, frame.left] = AXIS
    canvas[frame.bottom, frame.left : frame.right + 1] = AXIS

    curves = []
    if profile is not None and len(profile.position_mm):
        curves.append((profile.aorta_mm, CURVES[0]))
        if np.isfinite(profile.false_lumen_mm).any():
            curves += [(profile.true_lumen_mm, CURVES[1]), (profile.false_lumen_mm, CURVES[2])]
    for diameters, (_, colour) in curves:
        for index in range(len(diameters) - 1):
            pair = diameters[index : index + 2]
            if np.isfinite(pair).all():  # a gap stays a gap
                start = frame.pixel(profile.position_mm[index], pair[0])
                end = frame.pixel(profile.position_mm[index + 1], pair[1])
                draw_line(canvas, start, end, colour, 2)
    legend_left = frame.right - 150
    for number, (name, colour) in enumerate(name_colour for _, name_colour in curves):
        row = frame.top + 8 + number * (GLYPH_HEIGHT + 8)
        canvas[row + 3 : row + 6, legend_left : legend_left + 24] = colour
        draw_text(canvas, name, row, legend_left + 32, TEXT, 1)

    rows, columns = np.ogrid[:PLOT_HEIGHT, :PLOT_WIDTH]
    labels: list[tuple[int, int, int]] = []  # (top, left, right) of the numbers placed so far
    for point in points:
        row, column = frame.pixel(point.position_mm, point.diameter_mm)
        colour = landmark_colour(point.number)
        for dotted in range(row + MARKER_RADIUS + 2, frame.bottom, 4):
            canvas[dotted : dotted + 2, column] = colour
        distance = (rows - row) ** 2 + (columns - column) ** 2
        canvas[distance <= (MARKER_RADIUS + 1) ** 2] = TEXT  # a white ring keeps dark colours visible
        canvas[distance <= MARKER_RADIUS**2] = colour
        label = str(point.number)
        width = text_width(label, 2)
        top, left = row - MARKER_RADIUS - 6 - 2 * GLYPH_HEIGHT, column - width // 2
        while any(abs(top - other) < 2 * GLYPH_HEIGHT and left < right and other_left < left + width
                  for other, other_left, right in labels):
            top -= 2 * GLYPH_HEIGHT  # stack numbers of landmarks that lie close together
        labels.append((top, left, left + width))
        draw_text(canvas, label, max(top, 0), left, TEXT, 2)
    return canvas


# --------------------------------------------------------------------------------------------- Evans index


@dataclass
class EvansPageReport:
    values: dict[str, float]
    picture: Path
    files: list[ReportFile]


def evans_index_for_page(
    source: Any, segmentation: Segmentation, runtime: RuntimeOptions, folder: Path, stem: str
) -> EvansPageReport:
    """`tsrt evans-index` on the page's scan: the index (JSON) and its measured slice (PNG)."""
    from tsrt.companions.evans_index import EvansIndexer

    refuse_what_the_segmentation_lacks(EVANS, segmentation)
    indexer = EvansIndexer(runtime)  # the atlas and the models, checked before the scan is read again
    json_path, png_path = Path(folder) / f"{stem}_evans_index.json", Path(folder) / f"{stem}_evans_index.png"
    values = indexer.write(scan_input(source), json_path, png_path)
    files = [
        ReportFile("Evans index (JSON)", json_path, "application/json"),
        ReportFile("Measured slice (PNG)", png_path, "image/png"),
    ]
    return EvansPageReport(values, png_path, files)
