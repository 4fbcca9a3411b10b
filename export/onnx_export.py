"""Export trained nnU-Net v2 folds to ONNX graphs + recorded plans, verified against torch.

One graph per fold (`fold_N.onnx`) with its recorded plan (`fold_N.plan.json`, see tsrt/models/plan.py) and
verification report (`fold_N.verify.json`). Everything is written into a temporary folder next to OUT
and moved in only when every requested fold has exported and verified, so a failed export leaves OUT
as it was.

What this path shares with the torch-free one (fold selection, reading the result folder and its
checkpoints through the restricted reader, the recorded plan, metadata, staging) is imported from
tsrt.models.exporter, so both write the same plans; torch only builds the network from nnU-Net's own
classes, traces it to ONNX and is the reference the graph is verified against.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from tsrt.errors import InputError, ModelError
from tsrt.models.exporter import (
    FoldCheckpoint,
    ResultFolder,
    StagedFold,
    check_same_training,
    finish_fold,
    find_folds,
    load_fold_checkpoint,
    move_into,
    package_versions,
    random_verification_input,
    read_result_folder,
    recorded_plan,
    run_onnxruntime,
    staging_folder,
)
from tsrt.models.onnx_graph import (
    BATCH_AXIS_NAME,
    GRAPH_INPUT_NAME,
    GRAPH_OUTPUT_NAME,
    TWO_LEVEL_NORM_MIN_VOXELS,
)
from tsrt.models.plan import TORCH_GRAPH_BUILDER
from tsrt_export.verify import (
    FP16_TOLERANCE_FRACTION,
    FP32_TOLERANCE_FRACTION,
    CaseReport,
    centre_patch,
    check_graph,
    compare_logits,
)

LOG = logging.getLogger(__name__)

#: Packages whose versions a torch export records in the plan.
EXPORT_PACKAGES = ("tsrt", "torch", "nnunetv2", "onnx", "onnxruntime", "dynamic_network_architectures")
#: The exporter of float32 graphs: torch's TorchScript-based exporter (torch.onnx.export(dynamo=False)).
#: Measured with torch 2.14.1 on nnU-Net PlainConvUNets, it and the dynamo exporter emit the same
#: operators (Conv, InstanceNormalization, LeakyRelu, ConvTranspose, Concat; the TorchScript graph
#: adds Identity aliases for initializers with identical values, which ORT drops at load) with the
#: same numerics, so ORT CPU speed is the same within noise (6 stages 32..320 features, 64^3 tile:
#: best of 3 1.5 s both), and both are TensorRT friendly (static shapes, no shape subgraphs). The
#: TorchScript exporter is 2-5x faster (1 s vs 5 s on a small net, 4 s vs 8 s on a 6-stage one),
#: which matters for tests and 5-fold models.
#: fp16 graphs always use the dynamo exporter: the TorchScript exporter runs the module once, and
#: torch's CPU half-precision conv3d is so slow that a 128^3 TotalSegmentator-sized net had not
#: finished tracing after 19 minutes; dynamo traces with fake tensors.
USE_DYNAMO_EXPORTER = False

@dataclass(frozen=True)
class ModelSpec:
    """What all folds of one result folder share: the folder read torch-free, plus nnU-Net's managers."""

    source: ResultFolder
    plans_manager: Any  # nnunetv2 PlansManager
    configuration_manager: Any  # nnunetv2 ConfigurationManager
    label_manager: Any  # nnunetv2 LabelManager
    trainer_class: type | None  # None: not installed, build from the plans' architecture
    num_input_channels: int
    num_segmentation_heads: int

    @property
    def folder(self) -> Path:
        return self.source.folder

    @property
    def plans(self) -> dict[str, Any]:
        return self.source.plans

    @property
    def dataset_json(self) -> dict[str, Any]:
        return self.source.dataset_json

    @property
    def configuration_name(self) -> str:
        return self.source.configuration_name

    @property
    def trainer_name(self) -> str:
        return self.source.trainer_name

    @property
    def patch_size(self) -> list[int]:
        return [int(s) for s in self.configuration_manager.patch_size]


def export_model(
    model_folder: Path,
    out_dir: Path,
    *,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    fp16: bool = False,
    opset: int = 17,
    verify_image: Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Export the folds of an nnU-Net v2 result folder into OUT_DIR; return the written plan paths.

    Each graph is verified (ONNX checks, ORT vs torch on a seeded random input and, if given, on a
    centre patch of `verify_image` preprocessed by nnU-Net) before anything is moved into OUT_DIR.
    """
    model_folder = Path(model_folder)
    out_dir = Path(out_dir)
    fold_names = find_folds(model_folder, folds, checkpoint)
    # Through the restricted reader: a checkpoint that would run code when unpickled is refused here too.
    checkpoints = [load_fold_checkpoint(model_folder, fold, checkpoint) for fold in fold_names]
    spec = read_model_spec(model_folder, checkpoints[0])
    for other in checkpoints[1:]:
        check_same_training(other, checkpoints[0], spec.source)
    image_patch = preprocess_verification_patch(spec, Path(verify_image)) if verify_image is not None else None

    with staging_folder(out_dir) as staging, _progress_bar(progress) as bar:
        staged = [
            _export_fold(spec, ckpt, staging, fp16=fp16, opset=opset, image_patch=image_patch, bar=bar)
            for ckpt in checkpoints
        ]
        return move_into(staged, out_dir)


def read_model_spec(model_folder: Path, first_checkpoint: FoldCheckpoint) -> ModelSpec:
    """The result folder read as the torch-free path reads it, plus nnU-Net's managers for building the network."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    source = read_result_folder(model_folder, first_checkpoint)
    configuration = source.configuration_name
    try:
        plans_manager = PlansManager(source.plans)
        configuration_manager = plans_manager.get_configuration(configuration)
        label_manager = plans_manager.get_label_manager(source.dataset_json)
        num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, source.dataset_json)
        num_heads = int(label_manager.num_segmentation_heads)
    except (KeyError, AssertionError, RuntimeError, ValueError, TypeError) as err:
        raise ModelError(
            f"plans.json/dataset.json in {model_folder} are inconsistent ({type(err).__name__}: {err}): "
            "use the files the model was trained with."
        ) from None
    return ModelSpec(
        source=source,
        plans_manager=plans_manager,
        configuration_manager=configuration_manager,
        label_manager=label_manager,
        trainer_class=find_trainer_class(first_checkpoint.trainer_name, configuration_manager.network_arch_class_name),
        num_input_channels=int(num_input_channels),
        num_segmentation_heads=num_heads,
    )


def build_network(spec: ModelSpec) -> nn.Module:
    """Build the inference network as nnU-Net's predictor does: the trainer's build_network_architecture.

    Trainers such as TotalSegmentator's only change training, so a trainer class that is not installed
    falls back to nnU-Net's default builder from the plans' architecture (with a warning).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = spec.configuration_manager
    trainer_class = spec.trainer_class
    try:
        with _quiet():
            if trainer_class is None:
                network = get_network_from_plans(
                    cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
                    spec.num_input_channels, spec.num_segmentation_heads, allow_init=True, deep_supervision=False,
                )
            elif "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
                network = trainer_class.build_network_architecture(
                    spec.plans_manager, cm, spec.num_input_channels, spec.num_segmentation_heads,
                    enable_deep_supervision=False,
                )
            else:  # the pre-2.5 signature, still accepted by nnU-Net's predictor
                network = trainer_class.build_network_architecture(
                    cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
                    spec.num_input_channels, spec.num_segmentation_heads, enable_deep_supervision=False,
                )
    except (ImportError, AttributeError, TypeError, KeyError, ValueError, AssertionError) as err:
        raise ModelError(
            f"Cannot build network {cm.network_arch_class_name} from {spec.folder / 'plans.json'} "
            f"({type(err).__name__}: {err}): install the package defining it or fix the plans' architecture."
        ) from None
    return network


def find_trainer_class(trainer_name: str, network_class_name: str) -> type | None:
    """nnU-Net's trainer lookup, or None (with a warning) when the class is not installed."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with _quiet():
            return recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError, ImportError):
        LOG.warning(
            "Trainer class %s is not installed; building the network from the plans' architecture (%s) with "
            "nnU-Net's default builder, which is what every trainer that only changes training does.",
            trainer_name,
            network_class_name,
        )
        return None


def load_weights(network: nn.Module, ckpt: FoldCheckpoint, spec: ModelSpec) -> nn.Module:
    """Load the fold's weights strictly (as nnU-Net does) and explain shape mismatches in plans terms."""
    expected = network.state_dict()
    got = ckpt.network_weights
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"Checkpoint {ckpt.path} does not fit the network built from plans.json (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): use the plans.json the model was trained with."
        )
    mismatched = [k for k in expected if tuple(expected[k].shape) != tuple(got[k].shape)]
    if mismatched:
        out_key = [k for k in mismatched if "seg_layers" in k and k.endswith("weight")]
        if out_key:
            raise ModelError(
                f"Checkpoint {ckpt.path} has {got[out_key[0]].shape[0]} output channels but dataset.json's labels "
                f"give {spec.num_segmentation_heads} segmentation heads: use the dataset.json the model was "
                "trained with."
            )
        first = mismatched[0]
        raise ModelError(
            f"Checkpoint {ckpt.path} parameter {first} has shape {tuple(got[first].shape)}, the network built from "
            f"plans.json/dataset.json expects {tuple(expected[first].shape)} (input channels: "
            f"{spec.num_input_channels}): use the plans.json and dataset.json the model was trained with."
        )
    # The restricted reader's arrays; load_state_dict casts fp16 weights into the float32 network as torch.load's did.
    network.load_state_dict({key: torch.from_numpy(value) for key, value in got.items()})
    return network.eval()


# Instance norms over at least TWO_LEVEL_NORM_MIN_VOXELS voxels (tsrt.models.onnx_graph's constant, which the
# torch-free builder uses too) get two-level statistics (see _TwoLevelInstanceNorm).


class _TwoLevelInstanceNorm(nn.Module):
    """InstanceNorm whose mean and variance are reduced in two levels in the graph, for ORT parity with torch.

    ONNX Runtime's CPU InstanceNormalization (and a plain ReduceMean) accumulates the statistics of a
    channel sequentially in float32, so their error grows with the voxel count: measured on unit-variance
    channels, max error of the normalised output vs float64 is 9e-6 at 32^3, 1.5e-5 at 64^3 and 2e-4
    at 128^3, where torch stays below 1e-6. In a 6-stage 118-class network on a real CT patch that put
    ORT 1e-3 of the logit range away from torch. Reducing over the last axes first and then over the
    first spatial axis (partial sums of ~16k instead of 2M values) brings it back to ~3e-6. Small
    feature maps keep the native op, which is faster and which TensorRT fuses.
    """

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes are Python ints while tracing: channel and spatial axes are static in the graph.
        channels, spatial = int(x.shape[1]), [int(s) for s in x.shape[2:]]
        if math.prod(spatial) < TWO_LEVEL_NORM_MIN_VOXELS:
            return nn.functional.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        rows = x.reshape(-1, channels, spatial[0], math.prod(spatial[1:]))
        # Sums, not means: ReduceSum takes its axes as an input since opset 13, so graphs convert
        # between opsets 17 and 18 (ReduceMean changed form at 18 and breaks the dynamo
        # exporter's down-conversion).
        inverse_count = 1.0 / math.prod(spatial)
        mean = rows.sum(dim=3, keepdim=True).sum(dim=2, keepdim=True) * inverse_count
        centred = rows - mean
        variance = (centred * centred).sum(dim=3, keepdim=True).sum(dim=2, keepdim=True) * inverse_count
        normalised = (centred / torch.sqrt(variance + self.eps)).reshape(-1, channels, *spatial)
        if self.weight is None:
            return normalised
        affine_shape = (1, channels) + (1,) * len(spatial)
        return normalised * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)


class _Float32Island(nn.Module):
    """Runs one module in float32 inside an fp16 graph.

    InstanceNorm: the variance of fp16 activations overflows (values above ~256 square past 65504),
    turning whole tiles into NaN/black, a known reason for black TensorRT fp16 nnU-Net outputs.
    Average pooling (ResEnc skip paths): torch has no CPU half kernel for it, and the tracing
    exporter runs the network once; the pooled values fit fp16 either way.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


class _Float16Graph(nn.Module):
    """fp16 network behind float32 input/output, so the runtime feeds and reads the same tensors."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.half()).float()


def exportable_module(network: nn.Module, *, fp16: bool) -> nn.Module:
    """The module to export: a copy of the network with two-level InstanceNorms, optionally in fp16.

    fp16 keeps float32 islands (see _Float32Island) and float32 graph input and output.
    """
    graph = copy.deepcopy(network)
    _replace_modules(graph, nn.modules.instancenorm._InstanceNorm, _TwoLevelInstanceNorm)
    if not fp16:
        return graph.eval()
    _replace_modules(graph, (_TwoLevelInstanceNorm, nn.modules.pooling._AvgPoolNd), _Float32Island)
    graph.half()
    for module in graph.modules():
        if isinstance(module, _Float32Island):
            module.module.float()
    return _Float16Graph(graph).eval()


def _replace_modules(module: nn.Module, kinds: type | tuple[type, ...], wrap: Callable[[nn.Module], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, kinds):
            setattr(module, name, wrap(child))
        else:
            _replace_modules(child, kinds, wrap)


def export_graph(module: nn.Module, spec: ModelSpec, path: Path, opset: int, *, dynamo: bool) -> None:
    """Write the ONNX graph: batch axis dynamic, channel and spatial axes static.

    The runtime always feeds patch-sized tiles (it pads smaller images up to the patch, as nnU-Net
    does), so static spatial axes cost nothing and let ORT and TensorRT plan memory and pick conv
    kernels once; only the number of tiles per run varies, hence a dynamic batch axis.
    """
    names = {"input_names": [GRAPH_INPUT_NAME], "output_names": [GRAPH_OUTPUT_NAME], "opset_version": opset}
    with torch.no_grad(), _quiet():
        if dynamo:
            # torch.export specialises axes whose example size is 0 or 1, so the example has two tiles.
            example = torch.zeros(2, spec.num_input_channels, *spec.patch_size)
            batch = torch.export.Dim(BATCH_AXIS_NAME, min=1, max=4096)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
                **names,
            )
        else:
            example = torch.zeros(1, spec.num_input_channels, *spec.patch_size)
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, do_constant_folding=True,
                dynamic_axes={GRAPH_INPUT_NAME: {0: BATCH_AXIS_NAME}, GRAPH_OUTPUT_NAME: {0: BATCH_AXIS_NAME}},
                **names,
            )


def preprocess_verification_patch(spec: ModelSpec, image: Path) -> np.ndarray:
    """Preprocess `image` with nnU-Net's own preprocessor for this plan and take a centre patch (1, C, *patch).

    The image is used for every input channel: the check is about the graph, not about the data.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    if not image.is_file():
        raise InputError(f"Verification image {image} does not exist: pass an existing image file.")
    preprocessor_class = _preprocessor_class(spec) or DefaultPreprocessor
    try:
        with _quiet():
            data, _, _ = preprocessor_class(verbose=False).run_case(
                [str(image)] * spec.num_input_channels, None, spec.plans_manager, spec.configuration_manager,
                spec.dataset_json,
            )
    except Exception as err:  # any reader/resampler failure means: this image cannot be used
        raise InputError(
            f"nnU-Net cannot preprocess verification image {image} ({type(err).__name__}: {err}): pass another image."
        ) from None
    return centre_patch(np.asarray(data), spec.patch_size)[None]


def _preprocessor_class(spec: ModelSpec) -> type | None:
    try:
        return spec.configuration_manager.preprocessor_class
    except (KeyError, ImportError, AttributeError):
        return None


def _export_fold(
    spec: ModelSpec,
    ckpt: FoldCheckpoint,
    staging: Path,
    *,
    fp16: bool,
    opset: int,
    image_patch: np.ndarray | None,
    bar: _FoldProgress,
) -> StagedFold:
    stem = f"fold_{ckpt.fold}"
    graph_path = staging / f"{stem}.onnx"
    with bar.fold(ckpt.fold) as step:
        step("building network")
        network = load_weights(build_network(spec), ckpt, spec)
        step("exporting graph")
        export_graph(exportable_module(network, fp16=fp16), spec, graph_path, opset, dynamo=fp16 or USE_DYNAMO_EXPORTER)
        step("checking graph")
        check_graph(graph_path, [BATCH_AXIS_NAME, spec.num_segmentation_heads, *spec.patch_size])
        step("verifying against torch")
        verification = verify_graph(graph_path, network, spec, fp16=fp16, image_patch=image_patch)
        step("writing plan")
        plan = recorded_plan(
            spec.source, ckpt, graph_path, graph_precision="fp16" if fp16 else "fp32",
            graph_builder=TORCH_GRAPH_BUILDER, versions=package_versions(EXPORT_PACKAGES),
        )
        staged = finish_fold(staging, ckpt.fold, graph_path, plan, verification)
    bar.report(ckpt.fold, verification)
    return staged


def verify_graph(
    graph_path: Path, network: nn.Module, spec: ModelSpec, *, fp16: bool, image_patch: np.ndarray | None
) -> dict[str, Any]:
    """ORT (CPU) vs the float32 torch network; raise ModelError when the graph is off, else return the report."""
    tolerance_fraction = FP16_TOLERANCE_FRACTION if fp16 else FP32_TOLERANCE_FRACTION
    inputs = {"random": random_verification_input(spec.num_input_channels, spec.patch_size)}
    if image_patch is not None:
        inputs["image"] = image_patch.astype(np.float32)
    cases: list[CaseReport] = []
    for name, batch in inputs.items():
        candidate = run_onnxruntime(graph_path, batch)  # the whole batch at once: checks the dynamic axis
        for index in range(len(batch)):
            # torch one tile at a time (InstanceNorm is per tile) to halve the peak memory of big models
            with torch.no_grad():
                reference = network(torch.from_numpy(batch[index : index + 1])).numpy()
            cases.append(
                compare_logits(
                    name if len(batch) == 1 else f"{name}[{index}]", reference, candidate[index : index + 1],
                    tolerance_fraction=tolerance_fraction, has_regions=spec.label_manager.has_regions,
                )
            )
            del reference
        del candidate
    report = {
        "graph_precision": "fp16" if fp16 else "fp32",
        "tolerance_fraction_of_logit_range": tolerance_fraction,
        "reference": f"torch {torch.__version__} float32 on CPU",
        "candidate": "onnxruntime CPUExecutionProvider",
        "cases": [case.to_dict() for case in cases],
        "passed": all(case.passed for case in cases),
    }
    failed = [case for case in cases if not case.passed]
    if failed:
        raise ModelError(
            f"The exported graph of {graph_path.stem} disagrees with torch ({failed[0].summary()}); "
            "nothing was written: report this as a tsrt bug with the model's plans.json."
        )
    return report


#: Loggers that report the dynamo exporter's routine steps (opset choice, version conversion) as warnings.
_NOISY_LOGGERS = ("torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence nnU-Net's and torch's prints and warnings (class search, preprocessing, tracing) so the
    progress bar and the verification report stay readable; real problems raise instead."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _FoldProgress:
    """A rich progress bar per fold (one line per fold, advancing through the export steps)."""

    STEPS = 5

    def __init__(self, progress: Any | None, console: Any | None) -> None:
        self._progress = progress
        self._console = console

    @contextlib.contextmanager
    def fold(self, fold: str) -> Iterator[Any]:
        if self._progress is None:
            yield lambda description: None
            return
        task = self._progress.add_task(f"fold {fold}", total=self.STEPS)
        started = [False]

        def step(description: str) -> None:
            if started[0]:
                self._progress.advance(task)
            started[0] = True
            self._progress.update(task, description=f"fold {fold}: {description}")

        yield step
        self._progress.update(task, completed=self.STEPS, description=f"fold {fold}: verified")

    def report(self, fold: str, verification: dict[str, Any]) -> None:
        if self._console is None:
            return
        for case in verification["cases"]:
            self._console.print(
                f"fold {fold} [{verification['graph_precision']}] {case['name']}: max|Δ| {case['max_abs_diff']:.2e} "
                f"(tol {case['tolerance']:.2e}), {case['decision']} agreement {100 * case['agreement']:.3f}%, "
                f"{case['confident_disagreements']} confident disagreements",
                soft_wrap=True,
                markup=False,
            )


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[_FoldProgress]:
    if not enabled:
        yield _FoldProgress(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        yield _FoldProgress(progress, console)
