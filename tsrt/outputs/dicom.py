"""DICOM outputs: a label map as DICOM SEG (highdicom) or RTSTRUCT (rt-utils), referencing the input series.

TotalSegmentator's `--output_type dicom_seg` / `dicom_rtstruct` (2.18) for a DICOM input, with its
semantics: one segment / ROI per non-empty class of the output label map (task classes, limited
to --roi_subset), named by the class, in label order; SEG segments numbered 1..n and coded with
TotalSegmentator's SNOMED CT category/type and colour (`dicom_codes.toml`; generic "Tissue" codes
otherwise), algorithm "TotalSegmentator" of the TotalSegmentator version tsrt reproduces, type
AUTOMATIC, family "Artificial Intelligence"; series number 100. Files are named as upstream names
them (see `dicom_output_paths`). Manufacturer and software version say tsrt, which wrote the file, and
so does the algorithm identification beyond upstream's name and version (`AlgorithmIdentity`): its
source is tsrt and its version, its parameters the task, mode, models and options that ran. RTSTRUCT
ROIs say the same in their generation description.

Where upstream guesses the DICOM orientation from the image plane (axial/coronal/sagittal) and
flips axes, tsrt maps each source slice onto the label grid from the slice's own geometry
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing): the inverse of the DICOM -> NIfTI
conversion in `tsrt.pipeline.read`, exact for any orientation. highdicom and rt-utils are the `dicom` extra,
imported only here and only when a DICOM output is asked for.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.errors import InputError, OutputError, TsrtError, missing_extra
from tsrt.pipeline.read import Image, short_reason
from tsrt.pipeline.write import atomic_output

log = logging.getLogger("tsrt")

#: TotalSegmentator's --output_type values; "dicom" is its older spelling of dicom_rtstruct.
OUTPUT_TYPES = ("nifti", "dicom_seg", "dicom_rtstruct")
DICOM_OUTPUT_TYPES = ("dicom_seg", "dicom_rtstruct")
_ALIASES = {"dicom": "dicom_rtstruct"}
#: What each DICOM output needs from the `dicom` extra.
_EXTRA_MODULES = {"dicom_seg": "highdicom", "dicom_rtstruct": "rt_utils"}
#: TotalSegmentator's series number for the objects it writes.
SERIES_NUMBER = 100
#: A source pixel must land this close (in voxels) to a voxel centre of the label grid.
_GRID_TOLERANCE = 0.05
_CODES_PATH = Path(__file__).with_name("dicom_codes.toml")


def normalize_output_types(output_type: str | Sequence[str]) -> tuple[str, ...]:
    """`"nifti"`, `["nifti", "dicom_seg"]` or `"nifti,dicom_seg"` -> validated output types, in order."""
    values = [output_type] if isinstance(output_type, str) else list(output_type)
    types: list[str] = []
    for value in values:
        for name in str(value).split(","):
            name = _ALIASES.get(name.strip(), name.strip())
            if name not in OUTPUT_TYPES:
                raise TsrtError(f"Unknown output type {name!r}: choose one of {', '.join(OUTPUT_TYPES)}.")
            if name not in types:
                types.append(name)
    if not types:
        raise TsrtError(f"No output type given: choose one of {', '.join(OUTPUT_TYPES)}.")
    return tuple(types)


def require_dicom_extra(output_types: Sequence[str]) -> None:
    """Fail before any work, in one line, when a DICOM output's library is not installed."""
    import importlib.util

    for output_type in output_types:
        module = _EXTRA_MODULES.get(output_type)
        if module is None:
            continue
        try:
            installed = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules
            installed = False
        if not installed:
            raise missing_extra(f"--output_type {output_type}", module, "dicom")


def is_dicom_input(source: Any) -> bool:
    """A DICOM series on disk (a folder or a .zip of slices), as upstream tells DICOM from NIfTI input."""
    if not isinstance(source, (str, os.PathLike)):
        return False  # a nibabel image or an in-memory Image
    return not str(source).lower().endswith((".nii", ".nii.gz"))


def require_dicom_input(source: Any, output_types: Sequence[str]) -> None:
    """DICOM outputs reference the input's slices, so the input must be the DICOM series itself."""
    wanted = [t for t in output_types if t in DICOM_OUTPUT_TYPES]
    if wanted and not is_dicom_input(source):
        shown = source if isinstance(source, (str, os.PathLike)) else "a NIfTI image"
        raise InputError(
            f"--output_type {' '.join(wanted)} needs a DICOM series as input (a folder or .zip of slices), "
            f"but the input is {shown}; pass the DICOM series or use --output_type nifti."
        )


# --------------------------------------------------------------------------------------------- paths


def dicom_output_paths(output: Path, output_types: Sequence[str], task_name: str) -> dict[str, Path]:
    """Where each output type goes, named as TotalSegmentator 2.18 names them.

    One type: dicom_seg writes OUTPUT itself (OUTPUT/<SeriesInstanceUID>.dcm when OUTPUT is an
    existing folder: returned as the folder), dicom_rtstruct writes OUTPUT with .dcm appended when
    missing. Several types: one file each in OUTPUT (an existing folder; name <task>_segmentation)
    or next to it (name: OUTPUT's name up to its first dot): <name>.nii.gz (multilabel), <name>_seg.dcm,
    <name>_rtstruct.dcm.
    """
    output = Path(output)
    if len(output_types) == 1:
        (output_type,) = output_types
        if output_type == "dicom_rtstruct":
            if output.is_dir():
                example = output / "segmentations.dcm"
                raise OutputError(f"Output {output} is a folder; give the RTSTRUCT a file name such as {example}.")
            return {output_type: output if output.name.endswith(".dcm") else output.with_name(output.name + ".dcm")}
        return {output_type: output}
    if output.is_dir():
        folder, name = output, f"{task_name}_segmentation"
    else:
        folder, name = output.parent, output.name.split(".")[0]
    suffixes = {"nifti": ".nii.gz", "dicom_seg": "_seg.dcm", "dicom_rtstruct": "_rtstruct.dcm"}
    return {output_type: folder / f"{name}{suffixes[output_type]}" for output_type in output_types}


# --------------------------------------------------------------------------------------------- source series


@dataclass
class SourceSlice:
    """One source image of the series and where its pixels lie on the label grid."""

    dataset: Any  # pydicom Dataset (header only)
    origin: np.ndarray  # voxel index (i, j, k) of pixel (row 0, column 0)
    row_step: np.ndarray  # voxel index step for the next row (down a column)
    column_step: np.ndarray  # voxel index step for the next column (along a row)
    position_along_normal: float  # mm, for ordering the slices like rt-utils

    def frame(self, labels: np.ndarray) -> np.ndarray:
        """The labels under this slice's pixels, as a (rows, columns) array."""
        rows = np.arange(int(self.dataset.Rows))[:, None]
        columns = np.arange(int(self.dataset.Columns))[None, :]
        index = tuple(
            np.broadcast_to(
                self.origin[a] + self.row_step[a] * rows + self.column_step[a] * columns, (rows.size, columns.size)
            )
            for a in range(3)
        )
        return labels[index]


def load_source_series(source: Path, image: Image) -> list[SourceSlice]:
    """The input series' slices that make up `image`'s voxel grid, ordered along the slice normal.

    Every DICOM file under the folder (or in the zip) is read header-only; images that do not lie
    on the grid (localizers, other series) are left out. Each grid plane must be covered once.
    """
    import pydicom

    inverse = np.linalg.inv(np.asarray(image.affine, dtype=np.float64))
    shape = np.array(image.spatial_shape)
    slices: list[SourceSlice] = []
    for handle in _dicom_files(Path(source)):
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        placed = _place_on_grid(dataset, inverse, shape)
        if placed is not None:
            _complete_references(dataset)
            slices.append(placed)
    if not slices:
        raise InputError(
            f"No DICOM image in {source} lies on the segmented volume's grid; pass the series that was segmented."
        )
    axes = [int(np.flatnonzero((s.row_step == 0) & (s.column_step == 0))[0]) for s in slices]
    slice_axis = max(set(axes), key=axes.count)  # a stray image in another plane does not belong
    slices = [s for s, axis in zip(slices, axes) if axis == slice_axis]
    planes = sorted(int(s.origin[slice_axis]) for s in slices)
    if planes != list(range(int(shape[slice_axis]))):
        raise InputError(
            f"The DICOM images in {source} do not cover the segmented volume slice by slice "
            f"({len(slices)} images for {shape[slice_axis]} slices); pass the folder of the one series that was "
            "segmented."
        )
    return sorted(slices, key=lambda s: s.position_along_normal)


def _dicom_files(source: Path) -> Iterator[Any]:
    """A readable file (path or open handle) for every file of a DICOM folder (recursively, like tsrt.pipeline.read) or zip."""
    if source.is_dir():
        for root, dirs, names in os.walk(source):
            dirs.sort()
            for name in sorted(names):
                yield os.path.join(root, name)
        return
    try:
        with zipfile.ZipFile(source) as archive:
            for member in sorted(archive.namelist()):
                if not member.endswith("/"):
                    with archive.open(member) as handle:
                        yield handle
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{source} cannot be read as a .zip of DICOM files ({short_reason(error)}).") from None


#: Type-2 attributes highdicom copies from the source images; anonymisation sometimes drops them.
_PATIENT_STUDY_DEFAULTS = {
    "PatientID": "UNKNOWN", "PatientName": "UNKNOWN", "PatientBirthDate": "", "PatientSex": "",
    "AccessionNumber": "", "ReferringPhysicianName": "", "StudyID": "", "StudyDate": "", "StudyTime": "",
}
#: SOP classes by modality for images whose SOPClassUID was blanked (and absent from the file meta).
_SOP_CLASS_BY_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _complete_references(dataset: Any) -> None:
    """Fill what anonymisers blank and the output must reference: SOP class/instance UIDs, patient/study fields.

    The UIDs come from the file meta when the dataset's own are empty (as in TotalSegmentator's
    example series); without them the SEG/RTSTRUCT would point at no image.
    """
    meta = getattr(dataset, "file_meta", None)
    if not dataset.get("SOPClassUID"):
        from_meta = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        by_modality = _SOP_CLASS_BY_MODALITY.get(str(dataset.get("Modality", "CT")), _SECONDARY_CAPTURE)
        dataset.SOPClassUID = from_meta or by_modality
    if not dataset.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword, default in _PATIENT_STUDY_DEFAULTS.items():
        if keyword not in dataset:
            setattr(dataset, keyword, default)


def _place_on_grid(dataset: Any, inverse: np.ndarray, shape: np.ndarray) -> SourceSlice | None:
    """Where the slice's pixels fall on the label grid, or None when they are not voxel centres of it."""
    try:
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        position = np.array([float(v) for v in dataset.ImagePositionPatient])
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,) or int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        return None
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    rotation, offset = inverse[:3, :3], inverse[:3, 3]
    origin = rotation @ (position * lps_to_ras) + offset
    column_step = rotation @ (orientation[:3] * column_spacing * lps_to_ras)  # along a row: the next column
    row_step = rotation @ (orientation[3:] * row_spacing * lps_to_ras)
    vectors = np.stack([origin, column_step, row_step])
    rounded = np.round(vectors)
    if np.abs(vectors - rounded).max() > _GRID_TOLERANCE:
        return None
    origin, column_step, row_step = rounded.astype(np.int64)
    if np.abs(column_step).sum() != 1 or np.abs(row_step).sum() != 1 or np.abs(column_step + row_step).sum() != 2:
        return None  # not one voxel per pixel along two different grid axes
    corner = origin + (columns - 1) * column_step + (rows - 1) * row_step
    if np.any(np.minimum(origin, corner) < 0) or np.any(np.maximum(origin, corner) >= shape):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    return SourceSlice(dataset, origin, row_step, column_step, float(normal @ position))


# --------------------------------------------------------------------------------------------- codes


@cache
def _structure_codes() -> dict[str, dict[str, Any]]:
    from tsrt.models.registry import read_toml

    return dict(read_toml(_CODES_PATH).get("structures", {}))


def class_colour(label: int, name: str) -> tuple[int, int, int]:
    """TotalSegmentator's colour for the class, else tsrt's label palette colour (deterministic)."""
    from tsrt.pipeline.label_table import label_colour

    rgb = _structure_codes().get(name, {}).get("rgb")
    return tuple(rgb) if rgb else label_colour(label)  # type: ignore[return-value]


def _present_classes(frames: np.ndarray, label_map: Mapping[int, str]) -> list[tuple[int, str]]:
    """(label, name) of the classes with at least one voxel, in label order."""
    present = set(np.unique(frames).tolist())
    present.discard(0)
    return [(int(label), name) for label, name in sorted(label_map.items()) if int(label) in present]


def _frames(labels: np.ndarray, series: Sequence[SourceSlice]) -> np.ndarray:
    """The label map resampled onto the source images: (slices in series order, rows, columns)."""
    return np.stack([source.frame(labels) for source in series])


# --------------------------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class AlgorithmIdentity:
    """What made the segmentation, for DICOM's algorithm identification: the model (upstream's name and
    version, so viewers show what TotalSegmentator's own files show) run by tsrt, with its parameters."""

    name: str  # "TotalSegmentator"
    version: str  # the TotalSegmentator version of the tasks and weights
    parameters: Mapping[str, str]  # task, mode, models, options (key=value, comma-joined by highdicom)

    @property
    def source(self) -> str:
        from tsrt.version import __version__

        return f"tsrt {__version__}"

    def description(self) -> str:
        """One line (DICOM LO: at most 64 characters) for an RTSTRUCT ROI's generation description."""
        mode = self.parameters.get("mode", "")
        model = " ".join(part for part in (self.name, self.version, self.parameters.get("task", ""), mode) if part)
        return f"{model}, {self.source}"[:64]

    def sequence(self) -> Any:
        """highdicom's AlgorithmIdentificationSequence of a SEG segment."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        parameters = {key: str(value).replace(",", " ") for key, value in self.parameters.items()}
        return hd.AlgorithmIdentificationSequence(
            name=self.name, version=self.version, family=codes.DCM.ArtificialIntelligence, source=self.source,
            parameters=parameters,
        )


def write_dicom_seg(
    labels: np.ndarray,
    label_map: Mapping[int, str],
    series: Sequence[SourceSlice],
    path: Path,
    *,
    algorithm: AlgorithmIdentity,
) -> Path:
    """A binary DICOM SEG with one segment per present class (segment numbers 1..n in label order).

    `path` may be an existing folder: the file is then named after its SeriesInstanceUID, as upstream.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from tsrt.version import __version__

    frames = _frames(labels, series)
    present = _present_classes(frames, label_map)
    if not present:
        raise OutputError(
            "None of the task's classes was found in the image, and a DICOM SEG needs at least one segment; "
            "nothing was written (use --output_type nifti to get empty masks)."
        )
    lookup = np.zeros(max(int(labels.max()), max(label for label, _ in present)) + 1, dtype=np.uint16)
    descriptions = []
    for number, (label, name) in enumerate(present, start=1):
        lookup[label] = number
        codes_of_class = _structure_codes().get(name)
        category, kind = (
            (_coded(codes_of_class["category"]), _coded(codes_of_class["type"]))
            if codes_of_class else (codes.SCT.Tissue, codes.SCT.Tissue)
        )
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.sequence(),
            display_color=hd.color.CIELabColor.from_rgb(*class_colour(label, name)),
        ))
    series_uid = hd.UID()
    seg = hd.seg.Segmentation(
        source_images=[source.dataset for source in series],
        pixel_array=lookup[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tsrt",
        manufacturer_model_name="tsrt",
        software_versions=__version__,
        device_serial_number="1",
    )
    path = Path(path)
    if path.is_dir():
        path = path / f"{series_uid}.dcm"
    with atomic_output(path) as temp:
        seg.save_as(temp)
    return path


def _coded(code: Sequence[str]) -> Any:
    import highdicom as hd

    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_rtstruct(
    labels: np.ndarray,
    label_map: Mapping[int, str],
    series: Sequence[SourceSlice],
    path: Path,
    *,
    algorithm: AlgorithmIdentity | None = None,
) -> Path:
    """An RTSTRUCT with one ROI (contours per slice) per present class, in label order.

    With `algorithm`, the file names tsrt as its maker (not rt-utils) and each ROI the model that drew it.
    """
    from rt_utils import ds_helper
    from rt_utils.rtstruct import RTStruct

    from tsrt.version import __version__

    datasets = [source.dataset for source in series]
    frames = _frames(labels, series)
    with _quiet_pydicom():  # rt-utils sets transfer-syntax flags pydicom 3 warns about on every file
        rtstruct = RTStruct(datasets, ds_helper.create_rtstruct_dataset(datasets))
        for label, name in _present_classes(frames, label_map):
            mask = np.ascontiguousarray((frames == label).transpose(1, 2, 0))  # rt-utils: (rows, columns, slices)
            rtstruct.add_roi(mask=mask, name=name, color=list(class_colour(label, name)))
        if algorithm is not None:
            rtstruct.ds.Manufacturer = rtstruct.ds.ManufacturerModelName = "tsrt"
            rtstruct.ds.SoftwareVersions = __version__
            for roi in rtstruct.ds.StructureSetROISequence:
                roi.ROIGenerationDescription = algorithm.description()
        with atomic_output(Path(path)) as temp:
            rtstruct.ds.save_as(temp)
    return Path(path)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def write_dicom_outputs(
    labels: np.ndarray,
    label_map: Mapping[int, str],
    image: Image,
    source: Path,
    paths: Mapping[str, Path],
    *,
    algorithm: AlgorithmIdentity,
) -> list[Path]:
    """The DICOM files among `paths` (output type -> path) for the series at `source` (folder or zip)."""
    wanted = {t: p for t, p in paths.items() if t in DICOM_OUTPUT_TYPES}
    if not wanted:
        return []
    series = load_source_series(source, image)
    written = []
    for output_type, path in wanted.items():
        if output_type == "dicom_seg":
            written.append(write_dicom_seg(labels, label_map, series, path, algorithm=algorithm))
        else:
            written.append(write_rtstruct(labels, label_map, series, path, algorithm=algorithm))
    return written


__all__ = [
    "AlgorithmIdentity",
    "DICOM_OUTPUT_TYPES",
    "OUTPUT_TYPES",
    "SourceSlice",
    "class_colour",
    "dicom_output_paths",
    "is_dicom_input",
    "load_source_series",
    "normalize_output_types",
    "require_dicom_extra",
    "require_dicom_input",
    "write_dicom_outputs",
    "write_dicom_seg",
    "write_rtstruct",
]
