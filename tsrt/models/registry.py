"""The task registry: which TotalSegmentator tasks exist, which nnU-Net models each mode runs, and how.

It reads `tsrt/models/models.toml`, which export/generate_models_toml.py generates from the installed
TotalSegmentator (its schema is documented at the top of that file). Reading a file instead of
importing TotalSegmentator keeps the runtime free of torch.

    task = get_task("total", fast=True)
    task.parts            # the models to run, each with its trainer, folds, spacing, class map
    task.classes          # the task's final label map, as TotalSegmentator writes it
    task.required_models  # everything to have in the store (parts, crop and helper models)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from tsrt.errors import TsrtError

REGISTRY_PATH = Path(__file__).with_name("models.toml")
SCHEMA_VERSION = 1
MODES = ("normal", "fast", "fastest")


class TaskError(TsrtError):
    """An unknown task or model, or a mode the task does not have."""


@dataclass(frozen=True)
class ModelPart:
    """One nnU-Net model (a TotalSegmentator dataset) and how TotalSegmentator runs it."""

    name: str  # DatasetNNN_name: the release zip's and the store's folder name
    dataset_id: int
    result_folder: str  # DatasetNNN_name/Trainer__Plans__Configuration
    trainer: str
    plans: str
    configuration: str
    folds: tuple[int, ...] | None  # None: every fold_N the release holds
    resample_mm: tuple[float, float, float] | None  # x/y/z of the canonical image; None: native spacing
    step_size: float
    mirroring: bool
    license: bool
    classes: Mapping[int, str] = field(repr=False, compare=False)  # the name identifies the model
    release: str | None = None
    url: str | None = None
    license_task: str | None = None
    zip_sha256: str | None = None  # checked after download when recorded

    @property
    def fold_names(self) -> tuple[str, ...] | None:
        """Folds as the store and plans name them ("0", "1", ...), None for every released fold."""
        return None if self.folds is None else tuple(str(f) for f in self.folds)


@dataclass(frozen=True)
class Crop:
    """Run the task on the bounding box (+ margin) of some classes of a coarse segmentation."""

    classes: tuple[str, ...]
    margin_mm: tuple[float, float, float]
    source_model: ModelPart | None  # the coarse segmentation comes from this model...
    source_task: str | None  # ...or from running this whole task (normal mode) first
    robust_source_model: ModelPart | None  # used with --robust_crop; None: same as source_model
    cascade: bool
    remove_outside: tuple[str, ...] = ()
    remove_outside_dilation_mm: float | None = None


@dataclass(frozen=True)
class RoiSubsetCrop:
    """With --roi_subset: crop to the requested classes as found by a coarse model."""

    source_model: ModelPart
    robust_source_model: ModelPart | None
    margin_mm: tuple[float, float, float]


@dataclass(frozen=True)
class BodySeg:
    """With --body_seg: crop to the body found by a coarse model (binary), plus a margin."""

    model: ModelPart
    margin_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Helper:
    """An extra model run on the whole image whose output postprocessing uses (e.g. a body mask)."""

    role: str
    model: ModelPart
    params: Mapping[str, Any]


@dataclass(frozen=True)
class PostprocessStep:
    step: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Task:
    """One TotalSegmentator task in one mode (normal, fast or fastest)."""

    name: str
    mode: str
    modes: tuple[str, ...]  # every mode the task has
    modality: str
    license: bool
    roi_subset: bool
    classes: Mapping[int, str]
    parts: tuple[ModelPart, ...]
    remove_auxiliary_labels: tuple[int, ...]
    crop: Crop | None
    roi_subset_crop: RoiSubsetCrop | None
    body_seg: BodySeg | None
    helpers: tuple[Helper, ...]
    postprocess: tuple[PostprocessStep, ...]
    note: str | None = None
    _registry: "Registry | None" = field(default=None, repr=False, compare=False)

    @property
    def part_classes(self) -> dict[str, Mapping[int, str]]:
        """Each part's output labels (before they are renamed into `classes`)."""
        return {part.name: part.classes for part in self.parts}

    @property
    def required_models(self) -> tuple[ModelPart, ...]:
        """Every model this mode runs by default: its parts, its crop source (recursively) and helpers."""
        models: list[ModelPart] = list(self.parts)
        if self.crop is not None:
            if self.crop.source_model is not None:
                models.append(self.crop.source_model)
            if self.crop.source_task is not None and self._registry is not None:
                models.extend(self._registry.task(self.crop.source_task).required_models)
        models.extend(helper.model for helper in self.helpers)
        return _unique(models)

    @property
    def optional_models(self) -> tuple[ModelPart, ...]:
        """Models only some options run (--robust_crop, --roi_subset, --body_seg), not already required."""
        models: list[ModelPart] = []
        if self.crop is not None and self.crop.robust_source_model is not None:
            models.append(self.crop.robust_source_model)
        if self.roi_subset_crop is not None:
            models.append(self.roi_subset_crop.source_model)
            if self.roi_subset_crop.robust_source_model is not None:
                models.append(self.roi_subset_crop.robust_source_model)
        if self.body_seg is not None:
            models.append(self.body_seg.model)
        required = set(m.name for m in self.required_models)
        return tuple(m for m in _unique(models) if m.name not in required)


@dataclass(frozen=True)
class LicenseServer:
    """TotalSegmentator's license server and the key format totalseg_set_license accepts."""

    server_url: str
    download_endpoint: str
    download_body_keys: tuple[str, ...]  # JSON fields of a download request
    validate_endpoint: str
    validate_body_keys: tuple[str, ...]
    valid_status: str
    invalid_status: str  # the "status" of the answer to a rejected key
    key_prefix: str
    key_length: int
    config_key: str
    academic_license_url: str


class Registry:
    """The parsed models.toml. Use `load_registry()` (cached) rather than building one."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise TaskError(
                f"{path or 'The registry'} has schema version {data.get('schema_version')}, this tsrt reads "
                f"{SCHEMA_VERSION}: reinstall tsrt."
            )
        self.path = path
        self.totalsegmentator_version: str = data["totalsegmentator_version"]
        self.release_base_url: str = data["release"]["base_url"]
        self.license = LicenseServer(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in data["license"].items()
        })
        self.skipped_tasks: dict[str, str] = dict(data.get("skipped_tasks", {}))
        self.models: dict[str, ModelPart] = {name: _model(name, raw) for name, raw in data["models"].items()}
        self._tasks: dict[str, dict[str, Any]] = data["tasks"]
        self._resolved: dict[tuple[str, str], Task] = {}

    def task_names(self) -> list[str]:
        return list(self._tasks)

    def model(self, name: str) -> ModelPart:
        try:
            return self.models[name]
        except KeyError:
            raise TaskError(f"Unknown model {name!r}: `tsrt models list` shows the known ones.") from None

    def modes(self, name: str) -> tuple[str, ...]:
        return tuple(self._raw(name)["modes"])

    def resolve_mode(self, name: str, fast: bool = False, fastest: bool = False) -> str:
        """The mode TotalSegmentator runs for --fast/--fastest (fast wins when both are given)."""
        raw = self._raw(name)
        if fast:
            rule, flag = raw["fast"], "--fast"
        elif fastest:
            rule, flag = raw["fastest"], "--fastest"
        else:
            return "normal"
        if rule == "reject":
            raise TaskError(f"Task {name} has no {flag} mode: run it without {flag}.")
        if rule == "ignore":
            return "normal"
        return "fast" if rule == "fast" else ("fast" if fast else "fastest")

    def task(self, name: str, fast: bool = False, fastest: bool = False) -> Task:
        mode = self.resolve_mode(name, fast, fastest)
        key = (name, mode)
        if key not in self._resolved:
            self._resolved[key] = self._build_task(name, mode)
        return self._resolved[key]

    def _raw(self, name: str) -> dict[str, Any]:
        try:
            return self._tasks[name]
        except KeyError:
            reason = self.skipped_tasks.get(name)
            if reason is not None:
                raise TaskError(f"Task {name} is not available in tsrt ({reason}).") from None
            raise TaskError(f"Unknown task {name!r}: choose one of {', '.join(self._tasks)}.") from None

    def _build_task(self, name: str, mode: str) -> Task:
        raw = self._raw(name)
        raw_mode = raw["modes"][mode]
        crop = raw_mode.get("crop")
        roi = raw_mode.get("roi_subset_crop")
        body = raw_mode.get("body_seg")
        return Task(
            name=name,
            mode=mode,
            modes=tuple(raw["modes"]),
            modality=raw["modality"],
            license=bool(raw["license"]),
            roi_subset=bool(raw["roi_subset"]),
            classes=_class_map(raw["classes"]),
            parts=tuple(self.model(part) for part in raw_mode["parts"]),
            remove_auxiliary_labels=tuple(int(v) for v in raw_mode.get("remove_auxiliary_labels", ())),
            crop=None if crop is None else Crop(
                classes=tuple(crop["classes"]),
                margin_mm=_xyz(crop["margin_mm"]),
                source_model=self._optional_model(crop.get("source_model")),
                source_task=crop.get("source_task"),
                robust_source_model=self._optional_model(crop.get("robust_source_model")),
                cascade=bool(crop.get("cascade", False)),
                remove_outside=tuple(crop.get("remove_outside", ())),
                remove_outside_dilation_mm=crop.get("remove_outside_dilation_mm"),
            ),
            roi_subset_crop=None if roi is None else RoiSubsetCrop(
                source_model=self.model(roi["source_model"]),
                robust_source_model=self._optional_model(roi.get("robust_source_model")),
                margin_mm=_xyz(roi["margin_mm"]),
            ),
            body_seg=None if body is None else BodySeg(
                model=self.model(body["model"]), margin_mm=_xyz(body["margin_mm"])
            ),
            helpers=tuple(
                Helper(
                    role=h["role"],
                    model=self.model(h["model"]),
                    params=MappingProxyType({k: v for k, v in h.items() if k not in ("role", "model")}),
                )
                for h in raw_mode.get("helpers", ())
            ),
            postprocess=tuple(
                PostprocessStep(step["step"], MappingProxyType({k: v for k, v in step.items() if k != "step"}))
                for step in raw.get("postprocess", ())
            ),
            note=raw.get("note"),
            _registry=self,
        )

    def _optional_model(self, name: str | None) -> ModelPart | None:
        return None if name is None else self.model(name)


def _model(name: str, raw: dict[str, Any]) -> ModelPart:
    folds = raw["folds"]
    resample = raw.get("resample_mm")
    return ModelPart(
        name=name,
        dataset_id=int(raw["dataset_id"]),
        result_folder=raw["result_folder"],
        trainer=raw["trainer"],
        plans=raw["plans"],
        configuration=raw["configuration"],
        folds=None if folds == "all" else tuple(int(f) for f in folds),
        resample_mm=None if resample is None else _xyz(resample),
        step_size=float(raw["step_size"]),
        mirroring=bool(raw["mirroring"]),
        license=bool(raw["license"]),
        classes=_class_map(raw["classes"]),
        release=raw.get("release"),
        url=raw.get("url"),
        license_task=raw.get("license_task"),
        zip_sha256=raw.get("zip_sha256"),
    )


def _class_map(raw: Mapping[str, str]) -> Mapping[int, str]:
    return MappingProxyType({int(k): str(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))})


def _xyz(values: Any) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def _unique(models: list[ModelPart]) -> tuple[ModelPart, ...]:
    seen: dict[str, ModelPart] = {}
    for model in models:
        seen.setdefault(model.name, model)
    return tuple(seen.values())


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file tsrt ships (the registry, the DICOM codes), parsed; unreadable ones are one TaskError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise TaskError(
                "Reading the task registry needs Python 3.11+ or the tomli package: pip install tomli."
            ) from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise TaskError(f"The task registry {path} is missing: reinstall tsrt.") from None
    except tomllib.TOMLDecodeError as err:
        raise TaskError(f"The task registry {path} is not valid TOML ({err}): reinstall tsrt.") from None


@lru_cache(maxsize=4)
def load_registry(path: Path = REGISTRY_PATH) -> Registry:
    """The registry in `path` (default: the models.toml shipped with tsrt), parsed once per process."""
    return Registry(read_toml(Path(path)), path=Path(path))


def list_tasks() -> list[str]:
    """Every task tsrt knows, in TotalSegmentator's order."""
    return load_registry().task_names()


def get_task(name: str, fast: bool = False, fastest: bool = False) -> Task:
    """The task in the mode TotalSegmentator would run for these flags."""
    return load_registry().task(name, fast=fast, fastest=fastest)


def get_model(name: str) -> ModelPart:
    return load_registry().model(name)


def list_models() -> list[ModelPart]:
    return list(load_registry().models.values())


def class_map(task: str) -> Mapping[int, str]:
    """The task's final label map (label number -> TotalSegmentator class name)."""
    return get_task(task).classes
