"""The recorded plan: everything inference needs from a trained nnU-Net fold, without torch.

The exporters (tsrt.models.exporter without torch, tsrt_export.onnx_export with it) write one
`fold_N.plan.json` next to each `fold_N.onnx` in an exported model folder; the runtime reads them here. All spatial lists (spacing, patch size, mirror axes)
are in nnU-Net's *transposed* axis order, exactly as in nnU-Net's plans.

Exported model folder layout::

    MODEL_DIR/
        fold_0.onnx
        fold_0.plan.json
        fold_0.int8.onnx        (optional: `tsrt models quantize`, recorded in the plan's `int8` entry)
        fold_1.onnx
        fold_1.plan.json
        ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsrt.errors import ModelError, ProviderError

PLAN_FORMAT_VERSION = 1
PLAN_SUFFIX = ".plan.json"
#: An int8 graph sits beside its fp32 graph: fold_0.onnx -> fold_0.int8.onnx.
INT8_GRAPH_SUFFIX = ".int8.onnx"
#: `graph_builder` of graphs written by torch's ONNX exporter (tsrt_export.onnx_export), and of every plan
#: written before the field existed: until then only that exporter wrote graphs.
TORCH_GRAPH_BUILDER = "torch.onnx"
#: Fields a plan may lack (added after format version 1 shipped); they take their default.
_OPTIONAL_FIELDS = frozenset({"graph_builder", "int8"})

#: Fields that must be equal across the folds of one model, since the folds share one
#: preprocessing pass and their logits are averaged.
_SHARED_FIELDS = (
    "configuration",
    "image_reader_writer",
    "transpose_forward",
    "transpose_backward",
    "spacing",
    "patch_size",
    "num_input_channels",
    "normalization_schemes",
    "use_mask_for_norm",
    "foreground_intensity_properties_per_channel",
    "resampling_data",
    "resampling_probabilities",
    "labels",
    "regions_class_order",
    "num_segmentation_heads",
)


@dataclass(frozen=True)
class Resampling:
    """nnU-Net's resampling function name and its kwargs (is_seg, order, order_z, force_separate_z)."""

    function: str
    kwargs: dict[str, Any]

    @property
    def order(self) -> int:
        return int(self.kwargs.get("order", 3))

    @property
    def order_z(self) -> int:
        return int(self.kwargs.get("order_z", 0))

    @property
    def force_separate_z(self) -> bool | None:
        return self.kwargs.get("force_separate_z")

    @property
    def anisotropy_threshold(self) -> float:
        return float(self.kwargs.get("separate_z_anisotropy_threshold", 3.0))


@dataclass(frozen=True)
class RecordedPlan:
    """One fold's recorded plan. See the module docstring for where it lives."""

    format_version: int
    dataset_name: str
    plans_name: str
    configuration: str
    trainer: str
    fold: str
    network_class: str
    image_reader_writer: str
    file_ending: str
    transpose_forward: list[int]
    transpose_backward: list[int]
    spacing: list[float]
    patch_size: list[int]
    num_input_channels: int
    channel_names: dict[str, str]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    foreground_intensity_properties_per_channel: dict[str, dict[str, float]]
    resampling_data: Resampling
    resampling_probabilities: Resampling
    resampling_seg: Resampling
    labels: dict[str, Any]
    regions_class_order: list[int] | None
    num_segmentation_heads: int
    allowed_mirroring_axes: list[int] | None
    graph_file: str
    graph_sha256: str
    graph_input_name: str
    graph_output_name: str
    graph_precision: str
    checkpoint_file: str
    checkpoint_sha256: str
    versions: dict[str, str] = field(default_factory=dict)
    #: Which path built the graph: TORCH_GRAPH_BUILDER, or tsrt.models.onnx_graph.BUILDER_NAME (torch-free).
    graph_builder: str = TORCH_GRAPH_BUILDER
    #: The int8 graph `tsrt models quantize` installed after its accuracy gate (graph_file, graph_sha256,
    #: calibration, gate, ...), or None. Absent from plans without one, so they stay byte for byte as exported.
    int8: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def ndim(self) -> int:
        """2 for a 2d configuration (slices along the first transposed axis), else 3."""
        return len(self.patch_size)

    @property
    def graph_path(self) -> Path:
        if self.path is None:
            raise ModelError("This plan was not loaded from a file, so its graph cannot be found.")
        return self.path.parent / self.graph_file

    @property
    def int8_graph_path(self) -> Path | None:
        """The installed int8 graph, when the plan records one that passed its gate (or was forced)."""
        gate = (self.int8 or {}).get("gate", {})
        if not (gate.get("passed") or gate.get("forced")):
            return None
        return self.graph_path.with_name(str(self.int8["graph_file"]))

    @property
    def label_names(self) -> dict[int, str]:
        """Output label number -> class name (background excluded).

        For region-based models the output label of region i is regions_class_order[i].
        """
        if self.has_regions:
            names = [name for name in self.labels if name not in ("background", "ignore")]
            return {int(lbl): name for lbl, name in zip(self.regions_class_order or [], names)}
        return {int(v): k for k, v in self.labels.items() if k not in ("background", "ignore") and int(v) != 0}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name == "path" or (name == "int8" and self.int8 is None):
                continue
            value = getattr(self, name)
            if isinstance(value, Resampling):
                value = {"function": value.function, "kwargs": value.kwargs}
            data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> "RecordedPlan":
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise ModelError(
                f"Recorded plan {path or ''} has format version {data.get('format_version')}, this tsrt reads "
                f"version {PLAN_FORMAT_VERSION}: re-export the model with this version of tsrt."
            )
        values = dict(data)
        for key in ("resampling_data", "resampling_probabilities", "resampling_seg"):
            values[key] = Resampling(values[key]["function"], dict(values[key]["kwargs"]))
        known = set(cls.__dataclass_fields__) - {"path"}
        missing = known - set(values) - _OPTIONAL_FIELDS
        if missing:
            raise ModelError(f"Recorded plan {path or ''} lacks {sorted(missing)}: re-export the model.")
        return cls(**{k: values[k] for k in known if k in values}, path=path)

    def save(self, path: Path) -> None:
        path.write_text(plan_text(self.to_dict()))


def plan_text(data: dict[str, Any]) -> str:
    """A plan file's text, as every writer writes it (export, `tsrt models quantize`), so a plan's sha256 can be
    recomputed without its int8 record (tsrt.outputs.manifest)."""
    return json.dumps(data, indent=2, sort_keys=True)


def int8_graph_name(plan: RecordedPlan) -> str:
    """fold_0.onnx -> fold_0.int8.onnx: where `tsrt models quantize` puts a fold's int8 graph."""
    return plan.graph_file.removesuffix(".onnx") + INT8_GRAPH_SUFFIX


def has_int8(plans: list[RecordedPlan]) -> bool:
    """Whether every fold has a gated int8 graph (`--precision int8` runs only those)."""
    return bool(plans) and all(plan.int8_graph_path is not None for plan in plans)


def int8_missing(what: str, quantize_target: str) -> ProviderError:
    """The one line `--precision int8` stops with when `what` lacks gated int8 graphs, saying how to make them
    (`quantize_target` is what `tsrt models quantize` takes: a model folder, or a task and its mode)."""
    return ProviderError(
        f"--precision int8 needs a calibrated int8 graph, which {what} does not have: make one with "
        f"`tsrt models quantize {quantize_target} --calibration SCANS` (a few of your own scans), or use --precision fp32."
    )


def require_int8(plans: list[RecordedPlan], what: str, quantize_target: str) -> None:
    if not has_int8(plans):
        raise int8_missing(what, quantize_target)


def read_plan(path: Path) -> RecordedPlan:
    """Read one fold's plan file, turning unreadable JSON into an actionable error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"Recorded plan {path} does not exist: export the model with `tsrt export`.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"Recorded plan {path} is not valid JSON ({err}): re-export the model.") from None
    return RecordedPlan.from_dict(data, path=Path(path))


def load_model_plans(model_dir: Path, folds: list[str] | None = None) -> list[RecordedPlan]:
    """Read the plans of the requested folds (all exported folds when None) and check they agree."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"Model folder {model_dir} does not exist: export one with `tsrt export` first.")
    available = {p.name[: -len(PLAN_SUFFIX)].removeprefix("fold_"): p for p in model_dir.glob(f"fold_*{PLAN_SUFFIX}")}
    if not available:
        raise ModelError(f"{model_dir} holds no exported folds (fold_N.plan.json): run `tsrt export` on it.")
    wanted = sorted(available, key=_fold_sort_key) if folds is None else [str(f) for f in folds]
    unknown = [f for f in wanted if f not in available]
    if unknown:
        raise ModelError(
            f"Fold(s) {', '.join(unknown)} are not exported in {model_dir}; available: {', '.join(sorted(available))}."
        )
    plans = [read_plan(available[f]) for f in wanted]
    reference = plans[0].to_dict()
    for plan in plans[1:]:
        other = plan.to_dict()
        differing = [k for k in _SHARED_FIELDS if other[k] != reference[k]]
        if differing:
            raise ModelError(
                f"Folds {plans[0].fold} and {plan.fold} in {model_dir} disagree on {differing}: "
                "they cannot be ensembled; export them from the same nnU-Net plans."
            )
    return plans


def _fold_sort_key(fold: str) -> tuple[int, str]:
    return (0, f"{int(fold):06d}") if fold.isdigit() else (1, fold)
