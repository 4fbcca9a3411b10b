"""Segmentation for the web UI: the bundled demo model or an installed TotalSegmentator task, stage by stage.

The pipelines are tsrt's own (`tsrt.api` for the exported demo model, `tsrt.totalseg` for tasks);
this module only chooses one, reports progress per stage, and narrows the result to the structures
the clinician asked for.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tsrt.outputs.manifest import InputRecord, RunFacts, RunManifest, RunRecorder, RunRequest
from tsrt.pipeline.read import Image

DEMO_KEY = "demo"
DEMO_LABEL = "Demo (trained on phantoms, not for patients)"
DEMO_WARNING = (
    "The demo model was trained on tsrt's synthetic phantoms only, not on patients: on this scan its result is "
    "not the patient's anatomy. For real scans install a TotalSegmentator task (`tsrt models download total --fast`)."
)
#: Per scan modality, the tasks a scan starts with, best first: whole body, then the body outline.
PREFERRED_TASKS: dict[str, tuple[str, ...]] = {"CT": ("total", "body"), "MR": ("total_mr", "body_mr")}
#: Providers fast enough for the full-resolution models; without one, `fast` is preselected.
GPU_PROVIDERS = ("cuda", "tensorrt")
#: What the page imports on demand (opening a scan, segmenting, the reports), in one fixed order.
PAGE_MODULES = (
    "tsrt.totalseg.source", "tsrt.models.store", "tsrt.models.registry", "tsrt.models.plan", "tsrt.engines.providers",
    "tsrt.pipeline.infer", "tsrt.api", "tsrt.totalseg.options", "tsrt.totalseg.request", "tsrt.totalseg.runner",
    "tsrt.totalseg.task", "tsrt.totalseg.ops", "tsrt.demo.phantom", "tsrt.demo.run", "tsrt.companions.phase",
    "tsrt.companions.evans_index", "tsrt.reports.aorta", "tsrt.reports.aorta_measure", "tsrt.reports.aorta_render",
    "tsrt.reports.aorta_cpr", "tsrt.reports.pulmonary_render",
)
_page_modules_lock = threading.Lock()
_page_modules_loaded = False


def import_page_modules() -> None:
    """Import PAGE_MODULES once per server, one thread at a time, before a script run touches them.

    Streamlit runs each browser session in its own thread, and a session's new run starts while its old run is
    still stopping (fast reruns: a scan uploaded while the page is still loading). Two threads importing the same
    packages in different orders can each meet the other's half-initialised module; the failed import is then
    missing from sys.modules and the page showed a KeyError. Under this lock the imports happen once, in order.
    """
    global _page_modules_loaded
    with _page_modules_lock:
        if _page_modules_loaded:
            return
        for name in PAGE_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # an extra that is not installed: the page says so when that part is used
                pass
        _page_modules_loaded = True


class StageReporter(Protocol):
    """Where progress goes (the page's progress bars; nothing in tests that do not look)."""

    def stage(self, name: str) -> None:
        """A new stage starts; the previous one is finished."""

    def tiles(self, done: int, total: int) -> None:
        """Tiles of the current model finished so far."""


class SilentReporter:
    def stage(self, name: str) -> None:
        pass

    def tiles(self, done: int, total: int) -> None:
        pass


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu: the demo model or a task whose models are installed."""

    key: str  # DEMO_KEY or a TotalSegmentator task name
    label: str
    modality: str  # "CT" or "MR": what the report calls the mean intensity
    modes: tuple[str, ...]  # installed modes among "normal" and "fast"
    roi_subset: bool  # the task can crop to requested structures (faster than segmenting everything)

    def classes(self, fast: bool) -> dict[int, str]:
        """Label number -> structure name of what this model (in this mode) segments."""
        if self.key == DEMO_KEY:
            return demo_label_names()
        from tsrt.models.registry import get_task

        return dict(get_task(self.key, fast=fast).classes)


def demo_label_names() -> dict[int, str]:
    from tsrt.demo.run import demo_model_dir
    from tsrt.models.plan import load_model_plans

    return dict(load_model_plans(demo_model_dir())[0].label_names)


def model_choices(store_root: Path | None = None) -> list[ModelChoice]:
    """Every task with all models of its normal or fast mode complete in the store, then the demo model.

    The demo comes last: it only knows phantoms, so it must not look like the first thing to use on a patient.
    """
    from tsrt.models.registry import load_registry
    from tsrt.models.store import model_status, models_root

    demo = ModelChoice(DEMO_KEY, DEMO_LABEL, "CT", ("normal",), False)
    choices = []
    root = models_root(store_root)
    present = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    if not present:
        return [demo]
    registry = load_registry()
    for name in registry.task_names():
        installed = []
        for mode in registry.modes(name):
            if mode not in ("normal", "fast"):
                continue
            task = registry.task(name, fast=mode == "fast")
            models = task.required_models
            if all(m.name in present for m in models) and all(model_status(m, store_root).complete for m in models):
                installed.append(mode)
        if installed:
            task = registry.task(name, fast=installed[0] == "fast")
            label = f"{name} (TotalSegmentator task)"
            choices.append(ModelChoice(name, label, task.modality, tuple(installed), task.roi_subset))
    return [*choices, demo]


def default_choice(choices: Sequence[ModelChoice], modality: str | None) -> ModelChoice:
    """The best installed model for a scan of `modality` (CT when not known yet): the demo only if no task is installed.

    Tasks of the scan's modality come before the others, `total`/`total_mr` and then `body`/`body_mr` first.
    """
    modality = modality or "CT"
    preferred = PREFERRED_TASKS.get(modality, ())
    tasks = [c for c in choices if c.key != DEMO_KEY]
    if not tasks:
        return choices[-1]

    def rank(choice: ModelChoice) -> tuple[bool, int]:
        order = preferred.index(choice.key) if choice.key in preferred else len(preferred)
        return choice.modality != modality, order

    return min(tasks, key=rank)  # min keeps the registry's order among equals


def default_fast(choice: ModelChoice, providers: Sequence[str]) -> bool:
    """Whether `fast` starts ticked: when it is the only installed mode, or when it is installed and no GPU provider is."""
    if "normal" not in choice.modes:
        return True
    return "fast" in choice.modes and not any(name in providers for name in GPU_PROVIDERS)


def scan_modality(source) -> str:
    """CT or MR for a read scan (`tsrt.totalseg.SourceImage`): the DICOM's own word, else air below -500 means CT (HU)."""
    stated = source.image.extra.get("modality")
    if stated in PREFERRED_TASKS:
        return stated
    return "CT" if float(np.min(source.values)) < -500 else "MR"


def demo_fits(source) -> bool:
    """Whether the scan is one of tsrt's phantoms, the only images the demo model is trained for."""
    from tsrt.demo.phantom import is_phantom

    image = source.image
    return is_phantom(np.asarray(image.array), image.affine, image.spacing)


#: Providers on which the page runs a model's gated int8 graphs (`auto` takes the CPU for int8).
INT8_PROVIDERS = ("auto", "cpu", "openvino")


def precision_choices(providers: Sequence[str], provider: str = "auto", int8_graph: bool = False) -> list[str]:
    """fp32 first (the default), then the reduced precisions an installed provider runs natively here, and int8
    when the selected model has its gated int8 graphs (`has_gated_int8`) and `provider` runs them on the CPU."""
    from tsrt.engines.providers import native_bf16

    choices = ["fp32"]
    if "openvino" in providers and native_bf16():
        choices.append("bf16")
    if "tensorrt" in providers:
        choices.append("fp16")
    if int8_graph and provider in INT8_PROVIDERS:
        choices.append("int8")
    return choices


def has_gated_int8(key: str, fast: bool, store_root: Path | None = None) -> bool:
    """Whether the model `key` (DEMO_KEY or a task, in `fast` mode) has the gated int8 graphs `--precision int8`
    runs (`tsrt models quantize`): every fold of every model the task runs, as `tsrt segment` checks it."""
    from tsrt.errors import TsrtError
    from tsrt.models.plan import has_int8, load_model_plans

    if key == DEMO_KEY:
        from tsrt.demo.run import demo_model_dir

        return has_int8(load_model_plans(demo_model_dir()))
    from tsrt.totalseg.request import build_request, check_int8_installed

    try:
        check_int8_installed(build_request(key, fast=fast), store_root)
    except TsrtError:
        return False
    return True


def provider_choices() -> list[str]:
    """auto, then the execution providers this onnxruntime build has, by tsrt's names."""
    from tsrt.engines.providers import PROVIDER_NAMES, available_providers

    available = available_providers()
    return ["auto", *(name for name, ort_name in PROVIDER_NAMES.items() if ort_name in available)]


@dataclass
class Segmentation:
    """Labels on the input's voxel grid and how they were made."""

    image: Image
    values: np.ndarray  # the voxel values statistics use (tsrt.totalseg.SourceImage.values)
    labels: np.ndarray
    label_names: dict[int, str]
    model_label: str
    modality: str
    provider: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: RunManifest | None = None  # what made it; the result files add their names (tsrt.ui.results)


def segment_for_ui(
    source,
    choice: ModelChoice,
    *,
    fast: bool = False,
    structures: Sequence[str] = (),
    provider: str = "auto",
    precision: str = "fp32",
    reporter: StageReporter | None = None,
    store_root: Path | None = None,
    low_memory: bool = False,
) -> Segmentation:
    """Segment a read image (`tsrt.totalseg.SourceImage`) with the chosen model; `structures` narrows the result.

    The result carries its run manifest (without output names: `tsrt.ui.results` adds them when it writes).
    """
    reporter = reporter or SilentReporter()
    recorder = RunRecorder()
    if choice.key == DEMO_KEY:
        result, request, precision = _segment_with_demo_model(source, provider, precision, reporter, low_memory)
    else:
        result, request, precision = _segment_with_task(
            source, choice, fast, structures, provider, precision, reporter, store_root, low_memory
        )
    if structures and set(result.label_names.values()) - set(structures):
        result.labels, result.label_names = keep_structures(result.labels, result.label_names, structures)
    if structures:
        request = request.with_options(structures=sorted(structures))
    facts = RunFacts(source.image, result.provider, precision)
    result.manifest = recorder.manifest(request, InputRecord.of(source.path, source.image), facts, (), Path("."))
    return result


def keep_structures(
    labels: np.ndarray, label_names: dict[int, str], structures: Sequence[str]
) -> tuple[np.ndarray, dict[int, str]]:
    """Only the named structures (others become background), as --roi_subset leaves them."""
    from tsrt.totalseg.runner import output_label_map
    from tsrt.totalseg.ops import keep_roi_subset

    kept = output_label_map("", label_names, roi_subset=list(structures))
    return keep_roi_subset(np.array(labels), list(kept)), kept


def _segment_with_demo_model(
    source, provider: str, precision: str, reporter: StageReporter, low_memory: bool = False
) -> tuple[Segmentation, RunRequest, str]:
    """The demo model's segmentation, its request and the precision it ran in."""
    from tsrt.api import model_run_request, segment_image_with_model
    from tsrt.demo.run import demo_model_dir
    from tsrt.engines.providers import resolve_precision
    from tsrt.pipeline.infer import InferenceSettings, load_model

    reporter.stage("Loading the model")
    started = time.perf_counter()
    provider, precision = resolve_precision(provider, precision)
    model = load_model(demo_model_dir(), provider=provider, precision=precision, low_memory=low_memory)
    loaded = time.perf_counter()
    reporter.stage(f"Segmenting ({model.provider_used})")
    settings = InferenceSettings(progress=False, on_tiles=reporter.tiles)
    run = segment_image_with_model(source.image, model, settings)
    seconds = {"load model": loaded - started, "segment": time.perf_counter() - loaded}
    segmentation = Segmentation(
        source.image, source.values, run.labels, dict(run.label_names), DEMO_LABEL, "CT", model.provider_used,
        seconds=seconds,
    )
    request = model_run_request(demo_model_dir(), model.plans, settings, save_probabilities=False, precision=precision)
    return segmentation, request, model.precision_used


def _segment_with_task(
    source,
    choice: ModelChoice,
    fast: bool,
    structures: Sequence[str],
    provider: str,
    precision: str,
    reporter: StageReporter,
    store_root: Path | None,
    low_memory: bool = False,
) -> tuple[Segmentation, RunRequest, str]:
    """The task's segmentation, its request and the precision it ran in."""
    from tsrt.engines.providers import choose_provider
    from tsrt.totalseg.options import SegmentOptions
    from tsrt.totalseg.request import build_request, missing_models, models_to_run
    from tsrt.totalseg.runner import run_task
    from tsrt.totalseg.task import prepare_run, task_run_request

    reporter.stage("Checking the installed models")
    started = time.perf_counter()
    notes = []
    roi_subset = list(structures) if structures and choice.roi_subset else None
    if roi_subset is not None:
        crop_request = build_request(choice.key, fast=fast, roi_subset=roi_subset)
        if missing_models(models_to_run(crop_request)[0], store_root):
            notes.append("Segmented every structure and kept the chosen ones (the crop model is not installed).")
            roi_subset = None
    options = SegmentOptions(
        task=choice.key, fast=fast, roi_subset=roi_subset, provider=provider, precision=precision, quiet=True,
        models_dir=store_root, low_memory=low_memory,
    )
    request, runner, _ = prepare_run(options)
    runner.on_tiles = reporter.tiles
    checked = time.perf_counter()
    reporter.stage("Segmenting")
    result = run_task(source, request, runner)
    used_provider = runner.provider_used or choose_provider(provider).name  # what the sessions actually ran on
    label = f"{choice.key}{' --fast' if fast else ''}"
    segmentation = Segmentation(
        source.image, source.values, result.labels, dict(result.label_map), label, choice.modality,
        used_provider, notes=notes,
        seconds={"check models": checked - started, "segment": time.perf_counter() - checked},
    )
    return segmentation, task_run_request(options, request), runner.precision_used or "fp32"
