"""`tsrt demo`: the main job on an embedded default, end to end, with nothing to download.

Generates the deterministic CT phantom, segments it with the bundled demo model (a real nnU-Net
trained on phantoms with nnunetv2 and exported to ONNX), writes per-class masks, a multilabel file,
statistics.json and a preview PNG, and prints a per-class volume table with Dice against the
phantom's ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from tsrt.api import segment_image_with_model
from tsrt.engines.providers import resolve_precision
from tsrt.errors import ModelError
from tsrt.pipeline.infer import InferenceSettings, check_int8_model, load_model
from tsrt.outputs.files import write_segmentation_outputs
from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom
from tsrt.pipeline.read import read_image
from tsrt.pipeline.write import atomic_output


def demo_model_dir() -> Path:
    """The bundled demo model (package data), exported from models/demo with `tsrt export`."""
    folder = Path(__file__).resolve().parent / "model"  # package data, on disk in wheel and editable installs
    if not any(folder.glob("fold_*.plan.json")):
        raise ModelError(f"The bundled demo model is missing from {folder}: reinstall tsrt (pip install .).")
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


#: What `tsrt demo` writes into its output folder.
PHANTOM_FILE = "phantom_ct.nii.gz"
MULTILABEL_FILE = "segmentation.nii.gz"
MASKS_FOLDER = "segmentations"


def run_demo(
    output: Path,
    *,
    provider: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the demo into `output`; returns per-class volume (ml), mean HU and Dice vs ground truth.

    `say` hears what is being done (the CLI prints it); the result table is the caller's to show.
    """
    say = say or (lambda message: None)
    provider, precision = resolve_precision(provider, precision)  # refused before the phantom is written
    if precision == "int8":
        check_int8_model(demo_model_dir())  # the bundled model has no gated int8 graph unless quantized
    output = Path(output)
    phantom = make_phantom()
    ct_path = output / PHANTOM_FILE
    output.mkdir(parents=True, exist_ok=True)
    with atomic_output(ct_path) as temp:
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), temp)

    image = read_image(ct_path)
    model = load_model(demo_model_dir(), provider=provider, precision=precision)
    on = model.provider_used if precision == "fp32" else f"{model.provider_used} ({precision})"
    say(f"segmenting {ct_path} {image.spatial_shape} with the demo model on {on}")
    run = segment_image_with_model(image, model, InferenceSettings(progress=progress))
    outputs = write_segmentation_outputs(
        run.labels, image, run.label_names, output / MULTILABEL_FILE, multilabel=True, statistics=True, preview=True
    )
    write_segmentation_outputs(run.labels, image, run.label_names, output / MASKS_FOLDER)

    truth_by_name = {name: phantom.labels == label for label, name in PHANTOM_LABELS.items()}
    summary: dict[str, dict[str, float]] = {}
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    for label, name in run.label_names.items():
        predicted = run.labels == label
        volume_ml = int(predicted.sum()) * voxel_ml
        mean_hu = float(phantom.image[predicted].mean()) if predicted.any() else 0.0
        score = dice(predicted, truth_by_name[name]) if name in truth_by_name else float("nan")
        summary[name] = {"volume_ml": volume_ml, "mean_hu": mean_hu, "dice": score}
    say(
        f"wrote {outputs.multilabel}, {output / MASKS_FOLDER}/ ({len(run.label_names)} masks), "
        f"{outputs.statistics}, {outputs.preview}"
    )
    return summary
