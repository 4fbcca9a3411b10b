"""Python API for exported nnU-Net models: one call from an image file to written masks."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrt.infer import InferenceSettings, LoadedModel, load_model
from tsrt.outputs import WrittenOutputs, write_segmentation_outputs
from tsrt.predict import predict_array
from tsrt.read import Image, from_nnunet_array, read_image, to_nnunet_array
from tsrt.write import atomic_output, write_label_map

log = logging.getLogger("tsrt")


@dataclass
class SegmentationRun:
    """What one segmentation produced, and how long each stage took."""

    labels: np.ndarray  # on the input image's voxel grid (i, j, k)
    image: Image
    label_names: dict[int, str]
    outputs: WrittenOutputs | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def segment_image_with_model(
    image: Image,
    model: LoadedModel,
    settings: InferenceSettings | None = None,
    *,
    probabilities_path: Path | None = None,
) -> SegmentationRun:
    """Segment an already-read image with a loaded model; labels come back on the image's grid."""
    plan = model.plan
    data, properties = to_nnunet_array(image, plan.image_reader_writer)
    prediction = predict_array(data, properties["spacing"], model, settings, save_probabilities=probabilities_path is not None)
    labels = from_nnunet_array(prediction.labels, properties)
    if probabilities_path is not None and prediction.probabilities is not None:
        save_probabilities(probabilities_path, from_nnunet_array(prediction.probabilities, properties), image, plan.label_names)
    return SegmentationRun(labels=labels, image=image, label_names=plan.label_names, seconds=prediction.seconds)


def save_probabilities(path: Path, probabilities: np.ndarray, image: Image, label_names: dict[int, str]) -> Path:
    """Probabilities (classes, i, j, k) as .npz plus a JSON with the geometry to place them."""
    path = Path(path)
    with atomic_output(path) as temp:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float32))
    geometry = {"affine": image.affine.tolist(), "shape": list(image.spatial_shape), "labels": label_names}
    with atomic_output(path.with_suffix(".json")) as temp:
        temp.write_text(json.dumps(geometry, indent=2))
    return path


def segment(
    input_path: str | Path,
    output_path: str | Path,
    model_dir: str | Path,
    *,
    folds: Sequence[str | int] | None = None,
    tta: bool = True,
    step_size: float = 0.5,
    batch_size: int = 1,
    provider: str = "auto",
    device: str | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
) -> SegmentationRun:
    """Segment one image file with an exported nnU-Net model and write the label map (nnUNetv2_predict's defaults)."""
    started = time.perf_counter()
    image = read_image(input_path)
    read_seconds = time.perf_counter() - started
    model = load_model(Path(model_dir), folds=folds, provider=provider, device=device)
    settings = InferenceSettings(step_size=step_size, use_mirroring=tta, batch_size=batch_size, progress=progress)
    probabilities = Path(str(output_path).removesuffix(".gz").removesuffix(".nii") + ".npz") if save_probabilities else None
    run = segment_image_with_model(image, model, settings, probabilities_path=probabilities)
    started = time.perf_counter()
    write_label_map(run.labels, image, Path(output_path), label_names=run.label_names)
    run.seconds = {"read": read_seconds, **run.seconds, "write": time.perf_counter() - started}
    return run


def segment_to_outputs(
    image: Image,
    model: LoadedModel,
    output: Path,
    settings: InferenceSettings | None = None,
    *,
    multilabel: bool = False,
    statistics: bool = False,
    preview: bool = False,
) -> SegmentationRun:
    """Segment and write TotalSegmentator-style outputs (masks or --ml file, statistics, preview)."""
    run = segment_image_with_model(image, model, settings)
    started = time.perf_counter()
    run.outputs = write_segmentation_outputs(
        run.labels, image, run.label_names, Path(output), multilabel=multilabel, statistics=statistics, preview=preview
    )
    run.seconds["write"] = time.perf_counter() - started
    return run
