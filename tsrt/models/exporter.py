"""Export an nnU-Net v2 result folder to tsrt's model format without torch: fold_N.onnx, plan, report.

Why: a runtime-only install (no torch) must turn nnU-Net and TotalSegmentator checkpoints into graphs.
Each checkpoint is read by the restricted reader (tsrt.models.checkpoint: nothing in a checkpoint can
run code), its graph built by tsrt.models.onnx_graph. What the torch exporter (tsrt_export.onnx_export)
shares with this path lives here and is imported by it: fold selection, reading the folder's plans,
the recorded plan, the metadata embedded in the graph, staging and the final move. So both paths write
the same files with the same plans; only `graph_builder`, `versions` and the graph bytes differ.

Verified without torch: the ONNX checker (full) and strict shape inference, and ONNX Runtime running a
seeded random input of two tiles (the dynamic batch axis) to logits of the right shape, all finite. The
report (fold_N.verify.json) says the graph was not compared against torch; `tsrt export
--verify-with-torch` is the path that does, and the tests compare both paths' logits variant by variant.

Like the torch exporter, everything is written into a staging folder next to OUT and moved in only when
every requested fold has been built and verified, so a failed export leaves OUT as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from tsrt.errors import ModelError
from tsrt.models.checkpoint import CHECKPOINT_NAME, read_checkpoint
from tsrt.models.onnx_graph import (
    BATCH_AXIS_NAME,
    BUILDER_NAME,
    BUILDER_VERSION,
    GRAPH_INPUT_NAME,
    GRAPH_OUTPUT_NAME,
    build_graph_from_weights,
    has_regions,
    network_spec,
    num_input_channels,
    num_segmentation_heads,
    resolve_configuration,
    save_graph,
)
from tsrt.models.plan import PLAN_FORMAT_VERSION, PLAN_SUFFIX, RecordedPlan, Resampling
from tsrt.models.store import sha256_file
from tsrt.progress import progress as show_progress

#: Metadata keys of an exported graph (ONNX metadata_props): the plan and the verification report.
METADATA_PLAN_KEY = "tsrt_plan"
METADATA_VERIFICATION_KEY = "tsrt_verification"
VERIFY_SUFFIX = ".verify.json"
#: The random verification input has two tiles, so the dynamic batch axis is exercised too.
RANDOM_VERIFICATION_BATCH = 2
RANDOM_VERIFICATION_SEED = 0
#: Packages whose versions a torch-free export records (the torch exporter adds torch, nnunetv2, ...).
RUNTIME_PACKAGES = ("tsrt", "onnx", "onnxruntime", "numpy")


@dataclass(frozen=True)
class FoldCheckpoint:
    """One fold's checkpoint as the restricted reader returns it, with nnU-Net's fallbacks applied
    (trainer and configuration from the `Trainer__Plans__Configuration` folder name when not recorded)."""

    fold: str
    path: Path
    network_weights: dict[str, np.ndarray]
    trainer_name: str
    configuration: str
    inference_allowed_mirroring_axes: list[int] | None
    sha256: str


@dataclass(frozen=True)
class ResultFolder:
    """What all folds of one result folder share, read as nnU-Net's predictor reads it (without nnunetv2)."""

    folder: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration_name: str
    configuration: dict[str, Any]  # `inherits_from` resolved, old plans format converted (as nnU-Net does)
    trainer_name: str
    num_input_channels: int
    num_segmentation_heads: int
    has_regions: bool

    @property
    def patch_size(self) -> list[int]:
        return [int(s) for s in self.configuration["patch_size"]]

    @property
    def network_class_name(self) -> str:
        architecture = self.configuration.get("architecture")
        return str(architecture.get("network_class_name", "")) if isinstance(architecture, Mapping) else ""

    @property
    def regions_class_order(self) -> list[int] | None:
        if not self.has_regions:
            return None
        return [int(r) for r in self.dataset_json["regions_class_order"]]

    @property
    def foreground_intensity_properties_per_channel(self) -> dict[str, dict[str, float]]:
        """PlansManager's property: the old plans format called it `..._by_modality`."""
        properties = self.plans.get("foreground_intensity_properties_per_channel")
        if properties is None:
            properties = self.plans.get("foreground_intensity_properties_by_modality")
        if not isinstance(properties, Mapping):
            raise ModelError(
                f"{self.folder / 'plans.json'} lacks foreground_intensity_properties_per_channel: use the plans.json "
                "the model was trained with."
            )
        return {str(ch): {k: float(v) for k, v in props.items()} for ch, props in properties.items()}


@dataclass(frozen=True)
class StagedFold:
    """A fold's files in the staging folder."""

    fold: str
    files: list[Path]  # graph first, plan last: moved in this order so a plan never points at a missing graph
    plan_name: str


# --------------------------------------------------------------------------------------------
# The torch-free export
# --------------------------------------------------------------------------------------------


def export_result_folder(
    model_folder: Path,
    out_dir: Path,
    *,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = CHECKPOINT_NAME,
    progress: bool = True,
) -> list[Path]:
    """Export the folds of an nnU-Net v2 result folder into OUT_DIR without torch; return the plan paths.

    Folds are read one at a time (a checkpoint's arrays are freed once its graph is written), each is
    checked to come from the same trainer and configuration as the first, and nothing reaches OUT_DIR
    unless every fold succeeded.
    """
    model_folder = Path(model_folder)
    out_dir = Path(out_dir)
    fold_names = find_folds(model_folder, folds, checkpoint)
    pending: FoldCheckpoint | None = load_fold_checkpoint(model_folder, fold_names[0], checkpoint)
    source = read_result_folder(model_folder, pending)
    spec = network_spec(source.plans, source.dataset_json, source.configuration_name)
    first = dataclasses.replace(pending, network_weights={})  # for the consistency check, without its arrays
    with staging_folder(out_dir) as staging, show_progress(
        f"export {model_folder.name}", len(fold_names), enabled=progress
    ) as advance:
        staged = []
        for fold in fold_names:
            ckpt = pending if pending is not None else load_fold_checkpoint(model_folder, fold, checkpoint)
            pending = None
            check_same_training(ckpt, first, source)
            graph_path = save_graph(
                build_graph_from_weights(spec, ckpt.network_weights, source=f"Checkpoint {ckpt.path}"),
                staging / f"fold_{fold}.onnx",
            )
            verification = verify_without_torch(graph_path, source)
            plan = recorded_plan(
                source, ckpt, graph_path,
                graph_precision="fp32", graph_builder=BUILDER_NAME, versions=builder_versions(),
            )
            del ckpt  # the next fold's arrays replace this one's
            staged.append(finish_fold(staging, fold, graph_path, plan, verification))
            advance(1, f"fold {fold}")
        return move_into(staged, out_dir)


def verify_without_torch(graph_path: Path, source: ResultFolder) -> dict[str, Any]:
    """What can be checked without torch; a failure is a builder bug, reported as one ModelError line.

    The ONNX checker and strict shape inference already ran when the graph was saved (save_graph).
    """
    batch = random_verification_input(source.num_input_channels, source.patch_size)
    logits = run_onnxruntime(graph_path, batch)
    expected = [RANDOM_VERIFICATION_BATCH, source.num_segmentation_heads, *source.patch_size]
    finite = bool(np.isfinite(logits).all())
    case = {
        "name": "random",
        "input_shape": [int(s) for s in batch.shape],
        "logits_shape": [int(s) for s in logits.shape],
        "expected_logits_shape": expected,
        "finite": finite,
        "logit_min": float(np.nanmin(logits)) if logits.size else 0.0,
        "logit_max": float(np.nanmax(logits)) if logits.size else 0.0,
        "passed": list(logits.shape) == expected and finite,
    }
    if not case["passed"]:
        what = "non-finite logits" if list(logits.shape) == expected else f"logits of shape {case['logits_shape']}"
        raise ModelError(
            f"The built graph of {graph_path.stem} gives {what} on ONNX Runtime (expected {expected}, finite); "
            "nothing was written: report this as a tsrt bug with the model's plans.json."
        )
    return {
        "graph_precision": "fp32",
        "graph_builder": f"{BUILDER_NAME} {BUILDER_VERSION}",
        "compared_with_torch": False,
        "reference": "none: built without torch and not compared against torch "
        "(tsrt export --verify-with-torch compares with the torch network)",
        "candidate": "onnxruntime CPUExecutionProvider",
        "checks": [
            "onnx.checker full check",
            f"strict shape inference: output ({BATCH_AXIS_NAME}, heads, *patch)",
            f"onnxruntime runs a seeded random input of {RANDOM_VERIFICATION_BATCH} tiles to finite logits "
            "of the expected shape",
        ],
        "cases": [case],
        "passed": True,
    }


def builder_versions() -> dict[str, str]:
    """The versions a torch-free export records, the builder's own included."""
    return {**package_versions(RUNTIME_PACKAGES), BUILDER_NAME: BUILDER_VERSION}


# --------------------------------------------------------------------------------------------
# Shared with the torch exporter (tsrt_export.onnx_export imports these)
# --------------------------------------------------------------------------------------------


def find_folds(model_folder: Path, folds: Sequence[str | int] | None, checkpoint: str) -> list[str]:
    """The requested folds, each checked to hold the checkpoint.

    Like nnU-Net's predictor, None means every numbered fold_N holding the checkpoint; fold_all (trained
    on all cases) is only exported when asked for, since ensembling it with the CV folds double-counts.
    """
    if not (model_folder / "plans.json").is_file():
        raise ModelError(
            f"{model_folder} has no plans.json: pass an nnU-Net v2 result folder (Trainer__Plans__Configuration)."
        )
    with_checkpoint = [p.name.removeprefix("fold_") for p in model_folder.glob("fold_*") if (p / checkpoint).is_file()]
    if folds is None:
        numbered = sorted((f for f in with_checkpoint if f.isdigit()), key=int)
        if not numbered:
            action = "pass --fold all to export fold_all" if "all" in with_checkpoint else "pass another --checkpoint"
            raise ModelError(f"No fold_N folder in {model_folder} holds {checkpoint}: {action}.")
        return numbered
    names = [str(f) for f in folds]
    if not names:
        raise ModelError("No folds were requested: pass at least one fold, or none to export all folds.")
    missing = [f for f in names if f not in with_checkpoint]
    if missing:
        raise ModelError(
            f"Fold(s) {', '.join(missing)} have no {checkpoint} in {model_folder} "
            f"(folds with it: {', '.join(sorted(with_checkpoint)) or 'none'}): choose among those folds."
        )
    return names


def load_fold_checkpoint(model_folder: Path, fold: str, checkpoint: str) -> FoldCheckpoint:
    """Read a fold's checkpoint through the restricted reader (one ModelError line for anything wrong)."""
    path = model_folder / f"fold_{fold}" / checkpoint
    read = read_checkpoint(path)
    trainer_from_folder, _, configuration_from_folder = split_folder_name(model_folder)
    return FoldCheckpoint(
        fold=fold,
        path=path,
        network_weights=read.network_weights,
        trainer_name=read.trainer_name or trainer_from_folder,
        configuration=read.configuration or configuration_from_folder,
        inference_allowed_mirroring_axes=read.inference_allowed_mirroring_axes,
        sha256=read.sha256,
    )


def read_result_folder(model_folder: Path, first_checkpoint: FoldCheckpoint) -> ResultFolder:
    """Read plans.json and dataset.json as nnU-Net's predictor does (trainer/configuration from the checkpoint)."""
    plans = read_json(model_folder / "plans.json")
    dataset_json = read_json(model_folder / "dataset.json")
    configuration = first_checkpoint.configuration
    if configuration not in plans.get("configurations", {}):
        raise ModelError(
            f"The checkpoint was trained with configuration {configuration!r}, which {model_folder / 'plans.json'} "
            f"lacks (it has {sorted(plans.get('configurations', {}))}): use the plans.json the model was trained with."
        )
    for key in ("labels", "file_ending"):
        if key not in dataset_json:
            raise ModelError(
                f"{model_folder / 'dataset.json'} lacks {key!r}: use the dataset.json the model was trained with."
            )
    config = resolve_configuration(plans, configuration)
    regions = has_regions(dataset_json)
    if regions and not dataset_json.get("regions_class_order"):
        raise ModelError(f"{model_folder / 'dataset.json'} defines regions but no regions_class_order: add it.")
    if config.get("previous_stage") is not None:
        raise ModelError(
            f"Configuration {configuration} is a cascade stage (it needs the segmentation of "
            f"{config['previous_stage']} as input), which tsrt does not run: export a full-resolution one."
        )
    return ResultFolder(
        folder=model_folder,
        plans=plans,
        dataset_json=dataset_json,
        configuration_name=configuration,
        configuration=config,
        trainer_name=first_checkpoint.trainer_name,
        num_input_channels=num_input_channels(dataset_json),
        num_segmentation_heads=num_segmentation_heads(dataset_json),
        has_regions=regions,
    )


def check_same_training(ckpt: FoldCheckpoint, first: FoldCheckpoint, source: ResultFolder) -> None:
    """Folds are ensembled, so they must come from one trainer and configuration."""
    if (ckpt.trainer_name, ckpt.configuration) != (source.trainer_name, source.configuration_name):
        raise ModelError(
            f"Fold {ckpt.fold} was trained as {ckpt.trainer_name}/{ckpt.configuration} but fold "
            f"{first.fold} as {source.trainer_name}/{source.configuration_name}: export them separately."
        )


def recorded_plan(
    source: ResultFolder,
    ckpt: FoldCheckpoint,
    graph_path: Path,
    *,
    graph_precision: str,
    graph_builder: str,
    versions: dict[str, str],
) -> RecordedPlan:
    """Every field from plans.json, dataset.json and the checkpoint; graph_sha256 is filled in last."""
    plans, config = source.plans, source.configuration
    return RecordedPlan(
        format_version=PLAN_FORMAT_VERSION,
        dataset_name=str(plans["dataset_name"]),
        plans_name=str(plans["plans_name"]),
        configuration=source.configuration_name,
        trainer=source.trainer_name,
        fold=ckpt.fold,
        network_class=source.network_class_name,
        image_reader_writer=str(plans["image_reader_writer"]),
        file_ending=str(source.dataset_json["file_ending"]),
        transpose_forward=[int(a) for a in plans["transpose_forward"]],
        transpose_backward=[int(a) for a in plans["transpose_backward"]],
        spacing=[float(s) for s in config["spacing"]],
        patch_size=source.patch_size,
        num_input_channels=source.num_input_channels,
        channel_names={str(k): str(v) for k, v in channel_names(source.dataset_json).items()},
        normalization_schemes=[str(s) for s in config["normalization_schemes"]],
        use_mask_for_norm=[bool(m) for m in config["use_mask_for_norm"]],
        foreground_intensity_properties_per_channel=source.foreground_intensity_properties_per_channel,
        resampling_data=Resampling(config["resampling_fn_data"], dict(config["resampling_fn_data_kwargs"])),
        resampling_probabilities=Resampling(
            config["resampling_fn_probabilities"], dict(config["resampling_fn_probabilities_kwargs"])
        ),
        resampling_seg=Resampling(config["resampling_fn_seg"], dict(config["resampling_fn_seg_kwargs"])),
        labels=source.dataset_json["labels"],
        regions_class_order=source.regions_class_order,
        num_segmentation_heads=source.num_segmentation_heads,
        allowed_mirroring_axes=ckpt.inference_allowed_mirroring_axes,
        graph_file=graph_path.name,
        graph_sha256="",
        graph_input_name=GRAPH_INPUT_NAME,
        graph_output_name=GRAPH_OUTPUT_NAME,
        graph_precision=graph_precision,
        checkpoint_file=f"{source.folder.name}/fold_{ckpt.fold}/{ckpt.path.name}",
        checkpoint_sha256=ckpt.sha256,
        versions=versions,
        graph_builder=graph_builder,
    )


def finish_fold(
    staging: Path, fold: str, graph_path: Path, plan: RecordedPlan, verification: dict[str, Any]
) -> StagedFold:
    """Embed plan and report in the graph, then write the plan (with the graph's final sha256) and report."""
    embed_metadata(graph_path, plan, verification)
    plan = RecordedPlan.from_dict({**plan.to_dict(), "graph_sha256": sha256_file(graph_path)})
    plan_path = staging / f"fold_{fold}{PLAN_SUFFIX}"
    plan.save(plan_path)
    verify_path = staging / f"fold_{fold}{VERIFY_SUFFIX}"
    verify_path.write_text(json.dumps(verification, indent=2))
    return StagedFold(fold, [graph_path, verify_path, plan_path], plan_path.name)


def embed_metadata(graph_path: Path, plan: RecordedPlan, verification: dict[str, Any]) -> None:
    """Store the plan (its graph_sha256 empty: a file cannot hold its own hash) and the report in the graph."""
    import onnx

    model = onnx.load(str(graph_path))
    entries = {
        METADATA_PLAN_KEY: json.dumps(plan.to_dict(), sort_keys=True),
        METADATA_VERIFICATION_KEY: json.dumps(verification, sort_keys=True),
    }
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **entries})
    model.doc_string = f"nnU-Net v2 {plan.dataset_name} {plan.configuration} fold {plan.fold}, exported by tsrt"
    onnx.save(model, str(graph_path))
    onnx.checker.check_model(str(graph_path))


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A scratch folder next to OUT (so the final moves are renames within one file system), removed after."""
    out_parent = Path(out_dir).absolute().parent
    out_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).absolute().name}.tsrt-export-", dir=out_parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(staged: list[StagedFold], out_dir: Path) -> list[Path]:
    """Move the verified files into OUT_DIR; return the plan paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_paths = []
    for fold in staged:
        for file in fold.files:
            os.replace(file, out_dir / file.name)
        plan_paths.append(out_dir / fold.plan_name)
    return plan_paths


def random_verification_input(num_channels: int, patch_size: Sequence[int]) -> np.ndarray:
    """The seeded random tiles (RANDOM_VERIFICATION_BATCH of them) both export paths verify on."""
    rng = np.random.default_rng(RANDOM_VERIFICATION_SEED)
    return rng.standard_normal((RANDOM_VERIFICATION_BATCH, num_channels, *patch_size), dtype=np.float32)


def run_onnxruntime(graph_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run the graph on ONNX Runtime's CPU provider, the provider every tsrt install has."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # one run per session: return the memory of big tiles at once
    session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def channel_names(dataset_json: Mapping[str, Any]) -> Mapping[str, str]:
    return dataset_json.get("channel_names") or dataset_json.get("modality") or {}


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def split_folder_name(model_folder: Path) -> tuple[str, str, str]:
    """Trainer, plans and configuration from a `Trainer__Plans__Configuration` folder name."""
    parts = Path(model_folder).resolve().name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else ("", "", "")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist: pass a complete nnU-Net v2 result folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}): copy it again from the training machine.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a {type(data).__name__}, not a JSON object: use nnU-Net's file.")
    return data
