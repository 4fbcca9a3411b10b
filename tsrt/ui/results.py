"""What the result page offers, built once per run: the per-structure report and the files to download.

Volumes and mean intensities come from `tsrt.outputs.statistics` (TotalSegmentator's rules), the label file and
masks from `tsrt.outputs.files`, the overview from `tsrt.outputs.preview` - the same files `tsrt segment` writes -
and the run manifest (what made them) from `tsrt.outputs.manifest`, beside the label file and in the masks zip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrt.outputs.files import write_segmentation_outputs
from tsrt.outputs.manifest import FOLDER_MANIFEST, manifest_path
from tsrt.outputs.statistics import structure_statistics
from tsrt.ui.runner import Segmentation
from tsrt.pipeline.write import atomic_output

#: TotalSegmentator calls a mask within this many voxels of the scan's edge incomplete (tsrt.outputs.statistics).
BORDER_MARGIN = 3
STATUS_COMPLETE = "complete"
STATUS_AT_EDGE = "cut off at the scan edge"
STATUS_NOT_FOUND = "not found"


def mean_column(modality: str) -> str:
    return "mean HU" if modality == "CT" else "mean intensity"


def labels_touching_border(labels: np.ndarray, margin: int = BORDER_MARGIN) -> set[int]:
    """Every label `tsrt.outputs.statistics.touches_border` would flag, from the six edge slabs at once."""
    slabs = []
    for axis in range(labels.ndim):
        slabs.append(np.take(labels, range(min(margin, labels.shape[axis])), axis=axis).ravel())
        slabs.append(np.take(labels, range(max(0, labels.shape[axis] - margin), labels.shape[axis]), axis=axis).ravel())
    return {int(v) for v in np.unique(np.concatenate(slabs))} - {0}


def structure_report(segmentation: Segmentation) -> dict[str, list]:
    """Columns of the report table: structure, volume (ml), mean HU (or intensity for MR) and status."""
    names = segmentation.label_names
    stats = structure_statistics(
        segmentation.labels, segmentation.values, segmentation.image.spacing, names, exclude_masks_at_border=False
    )
    at_edge = labels_touching_border(segmentation.labels)
    mean_name = mean_column(segmentation.modality)
    columns: dict[str, list] = {"structure": [], "label": [], "volume (ml)": [], mean_name: [], "status": []}
    for label, name in names.items():
        volume_ml = stats[name]["volume"] / 1000.0
        found = volume_ml > 0
        columns["structure"].append(name)
        columns["label"].append(int(label))
        columns["volume (ml)"].append(round(volume_ml, 2))
        columns[mean_name].append(round(stats[name]["intensity"], 1) if found else None)
        columns["status"].append(
            STATUS_NOT_FOUND if not found else STATUS_AT_EDGE if label in at_edge else STATUS_COMPLETE
        )
    return columns


def report_csv(columns: dict[str, list]) -> bytes:
    """The report as CSV (UTF-8, one row per structure, empty cells for structures not found)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in zip(*columns.values()):
        writer.writerow("" if value is None else value for value in row)
    return text.getvalue().encode("utf-8")


def file_stem(name: str) -> str:
    """`ct_001.nii.gz` -> `ct_001`: the prefix of every file offered for download."""
    lowered = name.lower()
    for ending in (".nii.gz", ".nii", ".zip"):
        if lowered.endswith(ending):
            return name[: -len(ending)] or "scan"
    return name or "scan"


@dataclass
class ResultFiles:
    """Files of one run in the session folder; the per-class masks are written when first asked for."""

    segmentation: Segmentation
    folder: Path
    stem: str
    multilabel: Path
    overview: Path
    report: Path
    manifest: Path | None = None  # the run manifest (None: the segmentation came without one)
    _masks_zip: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def masks_zip_name(self) -> str:
        return f"{self.stem}_masks.zip"

    def masks_zip(self) -> Path:
        """One NIfTI mask per structure (`segmentations/<name>.nii.gz`, as TotalSegmentator names them), zipped.

        Built on first request (Streamlit calls this from its download thread): a whole-body task
        has over a hundred masks, which nobody should wait for unless they want them.
        """
        with self._lock:
            if self._masks_zip is None:
                seg = self.segmentation
                masks = write_segmentation_outputs(seg.labels, seg.image, seg.label_names, self.folder / "segmentations")
                target = self.folder / self.masks_zip_name
                with atomic_output(target) as temp:
                    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:  # .nii.gz: compressed
                        for mask in masks.masks:
                            archive.write(mask, f"segmentations/{mask.name}")
                        if self.manifest is not None:  # beside the masks, as in a mask folder tsrt writes
                            archive.write(self.manifest, f"segmentations/{FOLDER_MANIFEST}")
                self._masks_zip = target
            return self._masks_zip

    def masks_zip_bytes(self) -> bytes:
        return self.masks_zip().read_bytes()


def write_result_files(segmentation: Segmentation, report: dict[str, list], folder: Path, stem: str) -> ResultFiles:
    """The multilabel file (with its label table), the overview PNG and the CSV report."""
    seg = segmentation
    written = write_segmentation_outputs(
        seg.labels, seg.image, seg.label_names, Path(folder) / f"{stem}_segmentation.nii.gz",
        multilabel=True, preview=True, preview_name=f"{stem}_overview.png",
    )
    report_path = Path(folder) / f"{stem}_report.csv"
    with atomic_output(report_path) as temp:
        temp.write_bytes(report_csv(report))
    assert written.multilabel is not None and written.preview is not None
    manifest = None
    if seg.manifest is not None:  # last: it names the files above
        manifest = manifest_path(written.multilabel, folder=False)
        names = sorted(path.name for path in (written.multilabel, written.preview, report_path))
        dataclasses.replace(seg.manifest, outputs=tuple(names)).write(manifest)
    return ResultFiles(seg, Path(folder), stem, written.multilabel, written.preview, report_path, manifest)
