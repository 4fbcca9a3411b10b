"""The files a TotalSegmentator task writes: masks or one multilabel file, statistics, preview, DICOM, derived masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.models.registry import load_registry
from tsrt.outputs.dicom import AlgorithmIdentity, require_dicom_input
from tsrt.pipeline.read import Image
from tsrt.totalseg import ops
from tsrt.totalseg.request import TaskRequest
from tsrt.totalseg.runner import TaskResult
from tsrt.totalseg.source import header_zooms


@dataclass(frozen=True)
class OutputOptions:
    """What to write besides the masks, and how (TotalSegmentator's output flags)."""

    multilabel: bool = False
    statistics: bool = False
    statistics_file: Path | None = None  # --statistics PATH (upstream 2.18), else statistics.json beside the output
    preview: bool = False
    exclude_masks_at_border: bool = True
    stats_aggregation: str = "mean"
    normalized_intensities: bool = False
    radiomics: bool = False  # statistics_radiomics.json from the written masks (the radiomics extra)
    derived_masks: bool = True
    output_types: tuple[str, ...] = ("nifti",)
    probabilities: Path | None = None  # --save_probabilities: nnU-Net's .npz (+ .pkl) of the task's last model
    skip_saving: bool = False  # --skip_saving: no masks / label / DICOM files, side files still written

def statistics_for(
    result: TaskResult,
    request: TaskRequest,
    *,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
    normalized_intensities: bool = False,
) -> dict[str, dict[str, float]]:
    """statistics.json as TotalSegmentator computes it: on the resampled image for --fast, else on the input.

    Class names are the task's (v2 numbering even with --v1_order, as upstream), limited to roi_subset.
    `normalized_intensities`: intensities of the image min-max scaled to 0..1 (upstream's option).
    """
    from tsrt.outputs.statistics import structure_statistics

    names = dict(request.task.classes)
    if request.roi_subset is not None:
        names = {k: v for k, v in names.items() if v in request.roi_subset}
    if request.fast:
        if result.lowres is None:
            return {}
        labels, values, zooms = result.lowres.labels, result.lowres.values, result.lowres.zooms
    else:
        labels, values = result.labels, result.source.values
        zooms = header_zooms(result.source.image)
    return structure_statistics(
        labels, values, zooms, names, exclude_masks_at_border=exclude_masks_at_border, metric=metric,
        normalized_intensities=normalized_intensities,
    )

def label_image(labels: np.ndarray, image: Image, label_map: Mapping[int, str]) -> nib.Nifti1Image:
    """The multilabel nibabel image upstream returns: input header, uint8, label table extension."""
    from tsrt.pipeline.label_table import caret_label_table
    from tsrt.pipeline.write import output_header

    data = np.asarray(labels, dtype=np.uint8)
    header = output_header(image, data.shape, data.dtype)
    header.set_intent("label")
    if label_map:
        header.extensions.append(nib.nifti1.Nifti1Extension(0, caret_label_table(dict(label_map))))
    return nib.Nifti1Image(data, image.affine, header)

def write_task_outputs(
    result: TaskResult,
    request: TaskRequest,
    output: Path,
    *,
    multilabel: bool = False,
    statistics: bool = False,
    stats: dict[str, dict[str, float]] | None = None,
    preview: bool = False,
    derived_masks: bool = True,
    output_types: Sequence[str] = ("nifti",),
    statistics_file: Path | None = None,
    skip_saving: bool = False,
) -> list[Path]:
    """Masks (one per class, or one --ml file), derived masks, statistics.json and preview, laid out as upstream.

    With DICOM output types the label map goes into DICOM SEG / RTSTRUCT files (and, when nifti is
    among several types, one multilabel NIfTI) named as upstream names them; upstream then treats
    the output as multilabel, so statistics.json and the preview go next to OUTPUT. `statistics_file`
    (--statistics PATH) puts the statistics there instead; `skip_saving` writes only the side files.
    """
    from tsrt.outputs.files import output_folder, write_segmentation_outputs
    from tsrt.outputs.statistics import write_statistics

    output = Path(output)
    nifti_only = tuple(output_types) == ("nifti",)
    folder = output_folder(output, multilabel) if nifti_only else output.parent
    paths: list[Path] = []
    if skip_saving:
        pass
    elif nifti_only:
        written = write_segmentation_outputs(
            result.labels, result.source.image, result.label_map, output, multilabel=multilabel
        )
        paths = list(written.masks) + ([written.multilabel] if written.multilabel else [])
        if not multilabel and derived_masks and any(step.step == "derived_masks" for step in request.task.postprocess):
            paths.extend(_write_body_derived_masks(result, output))
    else:
        paths = _write_typed_outputs(result, request, output, output_types)
    if statistics and stats is not None:
        paths.append(write_statistics(stats, statistics_file or folder / "statistics.json"))
    if preview and result.lowres is not None:
        from tsrt.outputs.preview import write_preview

        lowres = result.lowres
        paths.append(write_preview(
            folder / f"preview_{request.task.name}.png", lowres.values, lowres.labels, lowres.affine, result.label_map,
            result.source.image.extra.get("modality"),
        ))
    return paths

def check_output_name(
    output: Path, *, multilabel: bool, output_types: Sequence[str], skip_saving: bool = False
) -> None:
    """Refuse an --ml OUTPUT name no NIfTI file can have, before any work (upstream fails only when saving)."""
    from tsrt.outputs.files import nifti_output_path

    if multilabel and tuple(output_types) == ("nifti",) and not skip_saving:
        nifti_output_path(output)


def _write_typed_outputs(
    result: TaskResult, request: TaskRequest, output: Path, output_types: Sequence[str]
) -> list[Path]:
    """--output_type with DICOM types: the files of `tsrt.outputs.dicom.dicom_output_paths`."""
    from tsrt.outputs.dicom import dicom_output_paths, write_dicom_outputs
    from tsrt.pipeline.write import write_label_map

    source = result.source
    require_dicom_input(source.path, output_types)
    assert source.path is not None
    paths = dicom_output_paths(output, output_types, request.task.name)
    written = []
    if "nifti" in paths:
        written.append(write_label_map(result.labels, source.image, paths["nifti"], label_names=dict(result.label_map)))
    written += write_dicom_outputs(
        result.labels, result.label_map, source.image, source.path, paths, algorithm=task_algorithm(request)
    )
    return written


def task_algorithm(request: TaskRequest) -> AlgorithmIdentity:
    """The DICOM algorithm identification of a task: TotalSegmentator's name and version (as upstream writes
    them), the task, its mode, the models it ran and the options that changed the masks."""
    from tsrt.totalseg.request import models_to_run

    task = request.task
    parameters = {"task": task.name, "mode": task.mode, "models": " ".join(m.name for m in models_to_run(request)[0])}
    optional = {
        "roi_subset": " ".join(request.roi_subset or ()), "robust_crop": request.robust_crop,
        "body_seg": request.body_seg, "force_split": request.force_split, "v1_order": request.v1_order,
        "remove_small_blobs_mm3": request.remove_small_blobs_mm3,
    }
    parameters.update({key: str(value) for key, value in optional.items() if value})
    return AlgorithmIdentity("TotalSegmentator", load_registry().totalsegmentator_version, parameters)

def _write_body_derived_masks(result: TaskResult, output: Path) -> list[Path]:
    """body.nii.gz (trunc + extremities) and skin.nii.gz, which upstream derives for the body task."""
    from tsrt.pipeline.write import write_label_map

    body = ops.combine_masks_from_labels(result.labels, result.label_map, "body")
    skin = ops.extract_skin(result.source.values, body)
    image = result.source.image
    return [write_label_map(body, image, output / "body.nii.gz"), write_label_map(skin, image, output / "skin.nii.gz")]
