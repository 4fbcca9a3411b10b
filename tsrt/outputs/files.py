"""The files a segmentation run leaves behind, named and laid out as TotalSegmentator does.

- without `multilabel`: OUTPUT is a folder with one binary mask per class (`liver.nii.gz`, ...);
- with `multilabel` (`--ml`): OUTPUT is one label file whose NIfTI extension carries the label map
  (OUTPUT without an ending: OUTPUT.nii, as TotalSegmentator writes it; see `nifti_output_path`);
- `statistics.json` and the preview PNG go into the output folder (next to the file for `--ml`).

Each file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrt.errors import OutputError
from tsrt.outputs.preview import write_preview
from tsrt.pipeline.read import Image
from tsrt.outputs.statistics import structure_statistics, write_statistics
from tsrt.pipeline.write import write_label_map


@dataclass
class WrittenOutputs:
    """Paths of everything written, for the CLI summary and the tests."""

    masks: list[Path] = field(default_factory=list)
    multilabel: Path | None = None
    statistics: Path | None = None
    preview: Path | None = None
    stats: dict[str, dict[str, float]] | None = None


def output_folder(output: Path, multilabel: bool) -> Path:
    """Where side files (statistics, preview) go: the output folder, or the --ml file's folder."""
    return output.parent if multilabel else output


def nifti_output_path(output: Path) -> Path:
    """The file a one-file OUTPUT (--ml, combine-masks) names, as TotalSegmentator's nibabel save names it.

    OUTPUT ending .nii or .nii.gz is the file; OUTPUT without an ending gets .nii (uncompressed, as
    nibabel appends). Other endings are refused in one line, before any work: upstream would write
    another format (.mgz, .img/.hdr) or fail only after the run (an unknown ending such as .001).
    """
    output = Path(output)
    name = output.name
    if name.lower().endswith((".nii", ".nii.gz")):
        return output
    if "." not in name:
        return output.with_name(name + ".nii")
    raise OutputError(
        f"Output {output} is one NIfTI file: end its name in .nii.gz or .nii (e.g. {name}.nii.gz)."
    )


def write_segmentation_outputs(
    labels: np.ndarray,
    image: Image,
    label_names: Mapping[int, str],
    output: Path,
    *,
    multilabel: bool = False,
    statistics: bool = False,
    preview: bool = False,
    preview_name: str = "preview.png",
) -> WrittenOutputs:
    """Write masks (per class or one multilabel file) plus optional statistics.json and preview."""
    output = Path(output)
    written = WrittenOutputs()
    folder = output_folder(output, multilabel)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"Cannot create the output folder {folder} ({err.strerror}); choose a writable location.") from None
    if multilabel:
        path = nifti_output_path(output)
        written.multilabel = write_label_map(labels, image, path, label_names=dict(label_names))
    else:
        for label, name in label_names.items():
            mask = (labels == label).astype(np.uint8)
            written.masks.append(write_label_map(mask, image, output / f"{name}.nii.gz"))
    if statistics:
        intensities = image.array if image.array.ndim == 3 else image.array[0]
        written.stats = structure_statistics(labels, intensities, image.spacing, label_names)
        written.statistics = write_statistics(written.stats, folder / "statistics.json")
    if preview:
        intensities = image.array if image.array.ndim == 3 else image.array[0]
        written.preview = write_preview(
            folder / preview_name, intensities, labels, image.affine, label_names, image.extra.get("modality")
        )
    return written
