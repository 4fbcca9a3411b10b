"""Python API for exported nnU-Net models: one call from an image file to written masks."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tsrt.engines.providers import resolve_precision
from tsrt.models.plan import RecordedPlan, load_model_plans
from tsrt.pipeline.infer import InferenceSettings, LoadedModel, check_int8_model, load_model
from tsrt.outputs.files import WrittenOutputs
from tsrt.outputs.manifest import (
    InputRecord, RunFacts, RunManifest, RunRecorder, RunRequest, manifest_path, plan_graph_records,
)
from tsrt.pipeline.predict import predict_array
from tsrt.pipeline.read import Image, from_nnunet_array, read_image, to_nnunet_array
from tsrt.pipeline.write import write_label_map, write_probabilities

log = logging.getLogger("tsrt")


@dataclass
class SegmentationRun:
    """What one segmentation produced, and how long each stage took."""

    labels: np.ndarray  # on the input image's voxel grid (i, j, k)
    image: Image
    label_names: dict[int, str]
    outputs: WrittenOutputs | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: RunManifest | None = None  # what `segment` wrote beside the label file


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
    prediction = predict_array(data, properties["spacing"], model, settings,
                               save_probabilities=probabilities_path is not None, overwrite_input=True)
    labels = from_nnunet_array(prediction.labels, properties)
    if probabilities_path is not None and prediction.probabilities is not None:
        write_probabilities(probabilities_path, prediction.probabilities, properties)
    return SegmentationRun(labels=labels, image=image, label_names=plan.label_names, seconds=prediction.seconds)


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
    precision: str = "fp32",
    low_memory: bool = False,
) -> SegmentationRun:
    """Segment one image file with an exported nnU-Net model and write the label map (nnUNetv2_predict's defaults).

    `precision` (fp32 | fp16 | bf16 | int8) is checked against the provider before the image is read.
    `low_memory`: the same labels in about half the peak memory, slower (tsrt.pipeline.infer.load_model).
    The run manifest is written last, beside the label file (`tsrt.outputs.manifest`).
    """
    provider, precision = resolve_precision(provider, precision)
    if precision == "int8":  # before the image is read: the gated int8 graphs, or how to make them
        check_int8_model(Path(model_dir), folds=folds, provider=provider)
    recorder = RunRecorder()
    started = time.perf_counter()
    image = read_image(input_path)
    read_seconds = time.perf_counter() - started
    model = load_model(
        Path(model_dir), folds=folds, provider=provider, device=device, precision=precision, low_memory=low_memory
    )
    settings = InferenceSettings(step_size=step_size, use_mirroring=tta, batch_size=batch_size, progress=progress)
    output_path = Path(output_path)
    run = write_model_segmentation(image, model, output_path, settings, save_probabilities=save_probabilities)
    run.seconds = {"read": read_seconds, **run.seconds}
    request = model_run_request(
        Path(model_dir), model.plans, settings, save_probabilities=save_probabilities, precision=precision
    )
    run.manifest = recorder.write(
        manifest_path(output_path, folder=False), request, InputRecord.of(Path(input_path), image),
        model_facts(image, model), model_outputs(output_path, save_probabilities),
    )
    return run


def model_run_request(
    model_dir: Path, plans: list[RecordedPlan], settings: InferenceSettings, *, save_probabilities: bool,
    precision: str = "fp32",
) -> RunRequest:
    """What the run manifest records of an exported model's request: the folds' graphs and the options
    that change the labels (folds, mirroring, tile step, batch size, precision) or add files (probabilities)."""
    options = {
        "folds": [plan.fold for plan in plans], "tta": settings.use_mirroring, "step_size": settings.step_size,
        "batch_size": settings.batch_size, "save_probabilities": save_probabilities, "precision": precision,
    }
    plan = plans[0]  # nnU-Net's result folder the folds were exported from names the model
    name = f"{plan.dataset_name}/{plan.trainer}__{plan.plans_name}__{plan.configuration}"
    return RunRequest(
        "model", name, options, plan_graph_records(name, plans, precision), str(Path(model_dir).resolve())
    )


def model_facts(image: Image, model: LoadedModel) -> RunFacts:
    return RunFacts(image, model.provider_used, model.precision_used)


def model_outputs(output_path: Path, save_probabilities: bool) -> list[Path]:
    """The files an exported model's run writes: the label file (and nnU-Net's probability files)."""
    if not save_probabilities:
        return [output_path]
    probabilities = probabilities_path(output_path)
    return [output_path, probabilities, probabilities.with_suffix(".pkl")]


def probabilities_path(output_path: Path) -> Path:
    """Where --save-probabilities puts the .npz next to the label file (nnU-Net's .pkl beside it)."""
    return Path(str(output_path).removesuffix(".gz").removesuffix(".nii") + ".npz")


def write_model_segmentation(
    image: Image,
    model: LoadedModel,
    output_path: Path,
    settings: InferenceSettings | None = None,
    *,
    save_probabilities: bool = False,
) -> SegmentationRun:
    """Segment a read image and write its label map (and probabilities): one image or one cohort case."""
    probabilities = probabilities_path(output_path) if save_probabilities else None
    run = segment_image_with_model(image, model, settings, probabilities_path=probabilities)
    started = time.perf_counter()
    write_label_map(run.labels, image, Path(output_path), label_names=run.label_names)
    run.seconds["write"] = time.perf_counter() - started
    return run


@dataclass(frozen=True)
class ModelJob:
    """An exported model over a cohort (`tsrt segment COHORT --model DIR`): picklable, so that each
    Ray worker opens its own ONNX Runtime sessions once (tsrt.cohort.cases.CohortJob)."""

    model_dir: Path
    folds: tuple[str, ...] | None = None
    tta: bool = True
    step_size: float = 0.5
    batch_size: int = 1
    provider: str = "auto"
    device: str | None = None
    save_probabilities: bool = False
    precision: str = "fp32"
    low_memory: bool = False

    def __post_init__(self) -> None:
        """Checked (and openvino-bf16 mapped) once, before any case is read."""
        provider, precision = resolve_precision(self.provider, self.precision)
        if precision == "int8":
            check_int8_model(Path(self.model_dir), folds=self.folds, provider=provider)
        object.__setattr__(self, "provider", provider)
        object.__setattr__(self, "precision", precision)

    def open(self, threads: int | None = None) -> ModelSegmenter:
        return ModelSegmenter(self, threads)


class ModelSegmenter:
    """A cohort's per-case work with an exported model; the sessions open on first use, then stay open."""

    def __init__(self, job: ModelJob, threads: int | None = None) -> None:
        self.job, self.threads = job, threads
        self._model: LoadedModel | None = None
        self.settings = InferenceSettings(
            step_size=job.step_size, use_mirroring=job.tta, batch_size=job.batch_size, progress=False
        )
        plans = load_model_plans(Path(job.model_dir), None if job.folds is None else list(job.folds))
        self.request = model_run_request(
            Path(job.model_dir), plans, self.settings, save_probabilities=job.save_probabilities,
            precision=job.precision,
        )

    def warm_up(self) -> None:
        if self._model is None:
            self._model = load_model(
                Path(self.job.model_dir), folds=self.job.folds, provider=self.job.provider, device=self.job.device,
                threads=self.threads, precision=self.job.precision, low_memory=self.job.low_memory,
            )

    def expected_outputs(self, case) -> list[Path]:
        return model_outputs(case.output, self.job.save_probabilities)

    def read(self, case) -> Image:
        return read_image(case.input)

    def segment(self, image: Image, output: Path) -> RunFacts:
        self.warm_up()
        assert self._model is not None
        write_model_segmentation(
            image, self._model, output, self.settings, save_probabilities=self.job.save_probabilities
        )
        return model_facts(image, self._model)
