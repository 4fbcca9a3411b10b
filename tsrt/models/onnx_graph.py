"""Build an nnU-Net v2 network's ONNX inference graph from plans.json and checkpoint arrays, without torch.

Why: a runtime-only install has no torch, yet it must turn nnU-Net/TotalSegmentator checkpoints into
graphs. This builder writes, node for node, the graph the torch exporter (tsrt_export.onnx_export, the
TorchScript path) writes for the same network, so both give the same logits on ONNX Runtime:

- the networks of dynamic_network_architectures that nnU-Net v2's planners use, `PlainConvUNet` and
  `ResidualEncoderUNet` (BasicBlockD residual blocks, ResNet-D skips: average pool + 1x1 conv + norm),
  2d and 3d, any stage count, per-stage kernel sizes and strides, conv bias, InstanceNorm (eps, affine)
  or none, LeakyReLU (negative_slope) / ReLU or none, dropout (identity at inference), nonlin_first;
- transposed-conv upsampling and skip concatenation, deep supervision off: only the last
  segmentation layer is computed and returned;
- the exporter's numerics: InstanceNorms over >= 2**16 voxels are written as the exporter's two-level
  reduction (ReduceSum over the trailing axes, then the first spatial axis; see TWO_LEVEL_NORM_MIN_VOXELS),
  smaller ones as ONNX InstanceNormalization;
- its interface: input `input` (batch, C, *patch) float32, output `logits` (batch, heads, *patch), the
  batch axis named `batch` and dynamic, spatial axes static, opset 17.

Every tensor of the checkpoint is checked against what the plans' arch_kwargs imply (missing, extra
or wrongly shaped keys are one ModelError line naming the key), including the aliases torch's
state_dict holds for shared modules (`...conv.weight` = `...all_modules.0.weight`, `encoder.*` =
`decoder.encoder.*`). An architecture it does not know is one line pointing at `tsrt export
--verify-with-torch` (the torch exporter).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tsrt.errors import ModelError

if TYPE_CHECKING:  # only its type: the builder takes any state_dict of numpy arrays
    from tsrt.models.checkpoint import NnunetCheckpoint

#: Which path built a graph (the torch exporter's graphs say "pytorch" in producer_name).
BUILDER_NAME = "tsrt-onnx-builder"
BUILDER_VERSION = "1"
GRAPH_INPUT_NAME = "input"
GRAPH_OUTPUT_NAME = "logits"
BATCH_AXIS_NAME = "batch"
OPSET = 17
#: The IR version torch 2.x writes for opset 17, so both paths' graphs load in the same runtimes.
IR_VERSION = 8
#: Instance norms over at least this many voxels get the exporter's two-level statistics (the torch exporter,
#: tsrt_export.onnx_export, imports this constant; see _TwoLevelInstanceNorm there for the measurements).
TWO_LEVEL_NORM_MIN_VOXELS = 1 << 16

PLAIN_CONV_UNET = "PlainConvUNet"
RESIDUAL_ENCODER_UNET = "ResidualEncoderUNet"
SUPPORTED_ARCHITECTURES = (PLAIN_CONV_UNET, RESIDUAL_ENCODER_UNET)

#: Keyword arguments each architecture's constructor accepts from plans.json (nnU-Net passes them all on).
_ARCH_KWARGS: dict[str, frozenset[str]] = {
    PLAIN_CONV_UNET: frozenset(
        {
            "n_stages",
            "features_per_stage",
            "conv_op",
            "kernel_sizes",
            "strides",
            "n_conv_per_stage",
            "n_conv_per_stage_decoder",
            "conv_bias",
            "norm_op",
            "norm_op_kwargs",
            "dropout_op",
            "dropout_op_kwargs",
            "nonlin",
            "nonlin_kwargs",
            "deep_supervision",
            "nonlin_first",
        }
    ),
    RESIDUAL_ENCODER_UNET: frozenset(
        {
            "n_stages",
            "features_per_stage",
            "conv_op",
            "kernel_sizes",
            "strides",
            "n_blocks_per_stage",
            "n_conv_per_stage_decoder",
            "conv_bias",
            "norm_op",
            "norm_op_kwargs",
            "dropout_op",
            "dropout_op_kwargs",
            "nonlin",
            "nonlin_kwargs",
            "deep_supervision",
            "block",
            "bottleneck_channels",
            "stem_channels",
        }
    ),
}


# --------------------------------------------------------------------------------------------
# What plans.json and dataset.json say the network is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSpec:
    """The inference network of one configuration, in the terms of dynamic_network_architectures."""

    architecture: str  # PLAIN_CONV_UNET or RESIDUAL_ENCODER_UNET
    network_class_name: str  # as plans.json spells it
    patch_size: tuple[int, ...]
    num_input_channels: int
    num_segmentation_heads: int
    has_regions: bool
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    blocks_per_stage: tuple[int, ...]  # convs per stage (PlainConvUNet) or residual blocks (ResidualEncoderUNet)
    convs_per_decoder_stage: tuple[int, ...]
    conv_bias: bool
    norm_eps: float | None  # None: no normalisation layers
    norm_affine: bool
    negative_slope: float | None  # LeakyReLU slope, 0.0 for ReLU, None: no nonlinearity
    nonlin_first: bool
    has_dropout: bool
    stem_channels: int | None  # ResidualEncoderUNet only

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def describe(self) -> str:
        """For error messages: which network the plans describe."""
        return (
            f"{self.architecture} ({self.n_stages} stages, {self.num_input_channels} input channel(s), "
            f"{self.num_segmentation_heads} segmentation heads)"
        )


def network_spec(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str) -> NetworkSpec:
    """Read the network of `configuration` as nnU-Net builds it for inference (deep supervision off).

    Input channels and segmentation heads are determined as nnU-Net does (determine_num_input_channels,
    LabelManager.num_segmentation_heads); `inherits_from` and the old plans format are resolved as
    nnU-Net's PlansManager / ConfigurationManager resolve them.
    """
    config = resolve_configuration(plans, configuration)
    if config.get("previous_stage") is not None:
        raise ModelError(
            f"Configuration {configuration} is a cascade stage (it needs the segmentation of "
            f"{config['previous_stage']} as input), which tsrt does not run: use a full-resolution one."
        )
    architecture = config.get("architecture")
    if not isinstance(architecture, Mapping):
        raise ModelError(
            f"plans.json configuration {configuration} has no architecture entry: use nnU-Net v2's plans.json."
        )
    class_name = str(architecture.get("network_class_name", ""))
    kind = _known_architecture(class_name)
    kwargs = dict(architecture.get("arch_kwargs") or {})
    unknown = sorted(set(kwargs) - _ARCH_KWARGS[kind])
    if unknown:
        raise ModelError(
            f"plans.json gives {kind} the argument {unknown[0]!r}, which it does not take: use the plans.json the "
            "model was trained with, or `tsrt export --verify-with-torch` (with torch) for a custom architecture."
        )
    patch_size = _int_list(config.get("patch_size"), "patch_size")
    ndim = len(patch_size)
    if ndim not in (2, 3):
        raise ModelError(f"plans.json configuration {configuration} has a {ndim}d patch_size; nnU-Net runs 2d and 3d.")
    n_stages = _positive_int(kwargs.get("n_stages"), "arch_kwargs.n_stages")
    features = _per_stage(kwargs.get("features_per_stage"), n_stages, "features_per_stage")
    kernel_sizes = tuple(
        _per_axis(k, ndim, "kernel_sizes") for k in _per_stage_raw(kwargs.get("kernel_sizes"), n_stages, "kernel_sizes")
    )
    strides = tuple(_per_axis(s, ndim, "strides") for s in _per_stage_raw(kwargs.get("strides"), n_stages, "strides"))
    blocks_key = "n_conv_per_stage" if kind == PLAIN_CONV_UNET else "n_blocks_per_stage"
    blocks = _per_stage(kwargs.get(blocks_key), n_stages, blocks_key)
    decoder_convs = _per_stage(kwargs.get("n_conv_per_stage_decoder"), n_stages - 1, "n_conv_per_stage_decoder")
    _check_conv_op(kwargs.get("conv_op"), ndim)
    norm_eps, norm_affine = _instance_norm(kwargs.get("norm_op"), kwargs.get("norm_op_kwargs"), ndim)
    stem_channels = None
    if kind == RESIDUAL_ENCODER_UNET:
        block = kwargs.get("block")
        if block is not None and str(block).rsplit(".", 1)[-1] != "BasicBlockD":
            raise ModelError(
                f"plans.json builds ResidualEncoderUNet with block {block}, which the torch-free builder does not "
                "know (it builds BasicBlockD): export it with `tsrt export --verify-with-torch` in an install with "
                "torch."
            )
        stem_channels = (
            None if kwargs.get("stem_channels") is None else _positive_int(kwargs["stem_channels"], "stem_channels")
        )
    return NetworkSpec(
        architecture=kind,
        network_class_name=class_name,
        patch_size=tuple(patch_size),
        num_input_channels=num_input_channels(dataset_json),
        num_segmentation_heads=num_segmentation_heads(dataset_json),
        has_regions=has_regions(dataset_json),
        features_per_stage=features,
        kernel_sizes=kernel_sizes,
        strides=strides,
        blocks_per_stage=blocks,
        convs_per_decoder_stage=decoder_convs,
        conv_bias=bool(kwargs.get("conv_bias", False)),
        norm_eps=norm_eps,
        norm_affine=norm_affine,
        negative_slope=_nonlin_slope(kwargs.get("nonlin"), kwargs.get("nonlin_kwargs")),
        nonlin_first=bool(kwargs.get("nonlin_first", False)) if kind == PLAIN_CONV_UNET else False,
        has_dropout=_has_dropout(kwargs.get("dropout_op")),
        stem_channels=stem_channels,
    )


def resolve_configuration(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """A configuration with `inherits_from` applied (PlansManager) and old-format plans converted
    (ConfigurationManager: `UNet_class_name` etc. become an `architecture` entry)."""
    configurations = plans.get("configurations") if isinstance(plans, Mapping) else None
    if not isinstance(configurations, Mapping) or configuration not in configurations:
        available = sorted(configurations) if isinstance(configurations, Mapping) else []
        raise ModelError(
            f"plans.json has no configuration {configuration!r} (it has {available}): use the plans.json the "
            "model was trained with."
        )
    config = _inherit(configurations, configuration, ())
    if "architecture" not in config:
        config = _convert_old_plans_format(config)
    return config


def num_input_channels(dataset_json: Mapping[str, Any]) -> int:
    """nnU-Net's rule: one input channel per entry of `modality` (old) or `channel_names`."""
    channels = dataset_json.get("modality") if "modality" in dataset_json else dataset_json.get("channel_names")
    if not isinstance(channels, Mapping) or not channels:
        raise ModelError("dataset.json has no channel_names: use the dataset.json the model was trained with.")
    return len(channels)


def has_regions(dataset_json: Mapping[str, Any]) -> bool:
    """nnU-Net's LabelManager rule: a label given as a list of more than one value makes the model region-based."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in _labels(dataset_json).values())


def num_segmentation_heads(dataset_json: Mapping[str, Any]) -> int:
    """LabelManager.num_segmentation_heads: foreground regions, or all label values (background included)."""
    labels = _labels(dataset_json)
    if has_regions(dataset_json):
        regions = [r for name, r in labels.items() if name != "ignore" and not (_values(r) and set(_values(r)) == {0})]
        return len(regions)
    return len({v for name, r in labels.items() if name != "ignore" for v in _values(r)})


# --------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------


def build_graph(
    plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str, checkpoint: NnunetCheckpoint
) -> onnx.ModelProto:
    """The float32 inference graph of one fold, interchangeable with the torch exporter's."""
    spec = network_spec(plans, dataset_json, configuration)
    return build_graph_from_weights(spec, checkpoint.network_weights, source=f"Checkpoint {checkpoint.path}")


def build_graph_from_weights(
    spec: NetworkSpec, weights: Mapping[str, np.ndarray], *, source: str = "The checkpoint"
) -> onnx.ModelProto:
    """Build the graph for `spec` from a state_dict of numpy arrays (checked key by key first)."""
    writer = _GraphWriter(spec)
    writer.write_network()
    primary = writer.check_weights(weights, source)
    graph = helper.make_graph(
        writer.nodes,
        f"nnunet_{spec.architecture}",
        [_value_info(GRAPH_INPUT_NAME, [BATCH_AXIS_NAME, spec.num_input_channels, *spec.patch_size])],
        [_value_info(GRAPH_OUTPUT_NAME, [BATCH_AXIS_NAME, spec.num_segmentation_heads, *spec.patch_size])],
        writer.initializers(primary),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=BUILDER_NAME,
        producer_version=BUILDER_VERSION,
    )
    model.ir_version = IR_VERSION
    return model


def weight_shapes(spec: NetworkSpec) -> dict[str, tuple[int, ...]]:
    """The distinct tensors the network of `spec` needs, with their shapes.

    Lets a benchmark or a GPU check make a network of any size (seeded weights) without torch;
    `state_dict_for` then adds the other names torch's state_dict gives the same tensors.
    """
    writer = _GraphWriter(spec)
    writer.write_network()
    return {key: param.shape for key, param in writer.params.items()}


def state_dict_for(spec: NetworkSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` (one per `weight_shapes` key) under every name a checkpoint of this network holds."""
    writer = _GraphWriter(spec)
    writer.write_network()
    return {name: tensors[key] for key, param in writer.params.items() for name in [key, *param.aliases]}


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Check the graph (ONNX checker, strict shape inference: the output must be (batch, heads, *patch))
    and write it; a failure is a builder bug, reported as one ModelError line."""
    path = Path(path)
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(
            f"The built graph is not valid ONNX ({' '.join(str(err).split())[:200]}); report this as a tsrt bug."
        ) from None
    declared = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    got = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    if declared != got:
        raise ModelError(f"The built graph computes output shape {got}, not {declared}; report this as a tsrt bug.")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@dataclass
class _FeatureMap:
    """A tensor of the graph: its name, channel count and static spatial shape."""

    name: str
    channels: int
    spatial: tuple[int, ...]


@dataclass
class _Param:
    """A checkpoint tensor the network needs: its shape, and the other state_dict keys naming the same tensor."""

    shape: tuple[int, ...]
    aliases: list[str] = field(default_factory=list)


class _GraphWriter:
    """Writes the nodes of the network in the exporter's order and records every tensor it needs."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.nodes: list[onnx.NodeProto] = []
        self.params: dict[str, _Param] = {}
        self.affine_params: list[tuple[str, str, tuple[int, ...]]] = []  # (initializer, checkpoint key, shape)
        self.constants: dict[str, np.ndarray] = {}
        self._counter = 0

    # -- network ------------------------------------------------------------------------------

    def write_network(self) -> None:
        spec = self.spec
        x = _FeatureMap(GRAPH_INPUT_NAME, spec.num_input_channels, spec.patch_size)
        if spec.architecture == PLAIN_CONV_UNET:
            skips = self._plain_encoder(x)
        else:
            skips = self._residual_encoder(x)
        self._decoder(skips)

    def _plain_encoder(self, x: _FeatureMap) -> list[_FeatureMap]:
        """PlainConvEncoder (pool='conv'): per stage a StackedConvBlocks whose first conv has the stage's stride."""
        spec, skips = self.spec, []
        for s, features in enumerate(spec.features_per_stage):
            x = self._stacked_convs(
                x, f"encoder.stages.{s}.0", spec.blocks_per_stage[s], features, spec.kernel_sizes[s], spec.strides[s]
            )
            skips.append(x)
        return skips

    def _residual_encoder(self, x: _FeatureMap) -> list[_FeatureMap]:
        """ResidualEncoder: a one-conv stem (stride 1), then per stage StackedResidualBlocks of BasicBlockD."""
        spec, skips = self.spec, []
        stem = spec.stem_channels or spec.features_per_stage[0]
        x = self._stacked_convs(x, "encoder.stem", 1, stem, spec.kernel_sizes[0], (1,) * spec.ndim)
        for s, features in enumerate(spec.features_per_stage):
            for b in range(spec.blocks_per_stage[s]):
                stride = spec.strides[s] if b == 0 else (1,) * spec.ndim
                x = self._basic_block(x, f"encoder.stages.{s}.blocks.{b}", features, spec.kernel_sizes[s], stride)
            skips.append(x)
        return skips

    def _decoder(self, skips: list[_FeatureMap]) -> None:
        """UNetDecoder: transposed conv up, concatenate [upsampled, skip], convs; last seg layer only."""
        spec = self.spec
        below = skips[-1]
        n = spec.n_stages
        for s in range(n - 1):
            skip = skips[-(s + 2)]
            stride = spec.strides[-(s + 1)]
            up = self._transposed_conv(below, f"decoder.transpconvs.{s}", skip.channels, stride)
            if up.spatial != skip.spatial:
                raise ModelError(
                    f"plans.json's patch_size {list(spec.patch_size)} is not divisible by the network's strides "
                    f"(decoder stage {s} upsamples to {list(up.spatial)} but its skip is {list(skip.spatial)}): use "
                    "the plans.json the model was trained with."
                )
            merged = self._node("Concat", [up.name, skip.name], axis=1)
            x = _FeatureMap(merged, up.channels + skip.channels, skip.spatial)
            below = self._stacked_convs(
                x,
                f"decoder.stages.{s}",
                spec.convs_per_decoder_stage[s],
                skip.channels,
                spec.kernel_sizes[-(s + 2)],
                (1,) * spec.ndim,
            )
        for s in range(n - 1):  # every seg layer is in the checkpoint (deep supervision); only the last runs
            features = skips[-(s + 2)].channels
            weight = self._param(
                f"decoder.seg_layers.{s}.weight", (spec.num_segmentation_heads, features, *(1,) * spec.ndim)
            )
            bias = self._param(f"decoder.seg_layers.{s}.bias", (spec.num_segmentation_heads,))
            if s == n - 2:
                self._conv_node(
                    below,
                    weight,
                    bias,
                    (1,) * spec.ndim,
                    (1,) * spec.ndim,
                    spec.num_segmentation_heads,
                    output=GRAPH_OUTPUT_NAME,
                )

    # -- blocks -------------------------------------------------------------------------------

    def _stacked_convs(
        self, x: _FeatureMap, prefix: str, count: int, channels: int, kernel: tuple[int, ...], stride: tuple[int, ...]
    ) -> _FeatureMap:
        for i in range(count):
            x = self._conv_norm_nonlin(
                x,
                f"{prefix}.convs.{i}",
                channels,
                kernel,
                stride if i == 0 else (1,) * len(kernel),
                with_nonlin=True,
                bias=self.spec.conv_bias,
            )
        return x

    def _basic_block(
        self, x: _FeatureMap, prefix: str, channels: int, kernel: tuple[int, ...], stride: tuple[int, ...]
    ) -> _FeatureMap:
        """BasicBlockD: skip = [avg pool if strided] + [1x1 conv (no bias) + norm if channels change]; then
        conv1 (norm, nonlin), conv2 (norm), add the skip, nonlin."""
        ones = (1,) * self.spec.ndim
        residual = x
        strided = any(s != 1 for s in stride)
        if strided:
            pooled = self._node(
                "AveragePool",
                [x.name],
                ceil_mode=0,
                count_include_pad=1,
                kernel_shape=list(stride),
                pads=[0] * (2 * len(stride)),
                strides=list(stride),
            )
            residual = _FeatureMap(pooled, x.channels, tuple((n - s) // s + 1 for n, s in zip(x.spatial, stride)))
        if x.channels != channels:
            residual = self._conv_norm_nonlin(
                residual,
                f"{prefix}.skip.{1 if strided else 0}",
                channels,
                ones,
                ones,
                with_nonlin=False,
                bias=False,
                dropout=False,
            )
        out = self._conv_norm_nonlin(
            x, f"{prefix}.conv1", channels, kernel, stride, with_nonlin=True, bias=self.spec.conv_bias
        )
        out = self._conv_norm_nonlin(
            out, f"{prefix}.conv2", channels, kernel, ones, with_nonlin=False, bias=self.spec.conv_bias, dropout=False
        )
        if out.spatial != residual.spatial:
            raise ModelError(
                f"plans.json's patch_size {list(self.spec.patch_size)} is not divisible by the network's strides "
                f"(block {prefix} gives {list(out.spatial)} and {list(residual.spatial)}): use the plans.json the "
                "model was trained with."
            )
        summed = _FeatureMap(self._node("Add", [out.name, residual.name]), channels, out.spatial)
        return self._nonlin(summed)

    def _conv_norm_nonlin(
        self,
        x: _FeatureMap,
        prefix: str,
        channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        *,
        with_nonlin: bool,
        bias: bool,
        dropout: bool | None = None,
    ) -> _FeatureMap:
        """ConvDropoutNormReLU: conv -> (dropout: identity) -> norm -> nonlin, or conv -> nonlin -> norm."""
        spec = self.spec
        dropout = spec.has_dropout if dropout is None else dropout
        has_norm = spec.norm_eps is not None
        has_nonlin = with_nonlin and spec.negative_slope is not None
        # Index of each module in `all_modules` (state_dict aliases of `conv` and `norm`).
        order = (
            ["conv"]
            + (["dropout"] if dropout else [])
            + (["norm"] if has_norm else [])
            + (["nonlin"] if has_nonlin else [])
        )
        if spec.nonlin_first and has_norm and has_nonlin:
            order[-1], order[-2] = order[-2], order[-1]
        weight = self._param(
            f"{prefix}.conv.weight",
            (channels, x.channels, *kernel),
            [f"{prefix}.all_modules.{order.index('conv')}.weight"],
        )
        conv_bias = (
            self._param(f"{prefix}.conv.bias", (channels,), [f"{prefix}.all_modules.{order.index('conv')}.bias"])
            if bias
            else None
        )
        y = self._conv_node(x, weight, conv_bias, kernel, stride, channels)
        for step in order[1:]:
            if step == "norm":
                y = self._instance_norm(y, prefix, order.index("norm"))
            elif step == "nonlin":
                y = self._nonlin(y)
        return y

    def _instance_norm(self, x: _FeatureMap, prefix: str, index: int) -> _FeatureMap:
        spec = self.spec
        eps = float(spec.norm_eps)
        if spec.norm_affine:
            scale = self._param(f"{prefix}.norm.weight", (x.channels,), [f"{prefix}.all_modules.{index}.weight"])
            shift = self._param(f"{prefix}.norm.bias", (x.channels,), [f"{prefix}.all_modules.{index}.bias"])
        if math.prod(x.spatial) < TWO_LEVEL_NORM_MIN_VOXELS:
            if not spec.norm_affine:  # torch's exporter feeds ones and zeros for a non-affine norm
                scale = self._constant(np.ones(x.channels, np.float32))
                shift = self._constant(np.zeros(x.channels, np.float32))
            out = self._node("InstanceNormalization", [x.name, scale, shift], epsilon=eps)
            return _FeatureMap(out, x.channels, x.spatial)
        # The exporter's _TwoLevelInstanceNorm, op for op: sums over the trailing axes, then the first one.
        rows_shape = [-1, x.channels, x.spatial[0], math.prod(x.spatial[1:])]
        rows = self._node("Reshape", [x.name, self._constant(np.array(rows_shape, np.int64))], allowzero=0)
        last_axis = self._constant(np.array([3], np.int64))
        first_axis = self._constant(np.array([2], np.int64))
        inverse_count = self._constant(np.array(1.0 / math.prod(x.spatial), np.float32))
        total = self._node(
            "ReduceSum", [self._node("ReduceSum", [rows, last_axis], keepdims=1), first_axis], keepdims=1
        )
        mean = self._node("Mul", [total, inverse_count])
        centred = self._node("Sub", [rows, mean])
        squares = self._node("Mul", [centred, centred])
        square_sum = self._node(
            "ReduceSum", [self._node("ReduceSum", [squares, last_axis], keepdims=1), first_axis], keepdims=1
        )
        variance = self._node("Mul", [square_sum, inverse_count])
        deviation = self._node("Sqrt", [self._node("Add", [variance, self._constant(np.array(eps, np.float32))])])
        normalised = self._node("Div", [centred, deviation])
        out = self._node(
            "Reshape", [normalised, self._constant(np.array([-1, x.channels, *x.spatial], np.int64))], allowzero=0
        )
        if spec.norm_affine:
            affine_shape = (1, x.channels) + (1,) * len(x.spatial)
            out = self._node("Mul", [out, self._reshaped(scale, affine_shape)])
            out = self._node("Add", [out, self._reshaped(shift, affine_shape)])
        return _FeatureMap(out, x.channels, x.spatial)

    def _nonlin(self, x: _FeatureMap) -> _FeatureMap:
        slope = self.spec.negative_slope
        if slope is None:
            return x
        out = self._node("Relu", [x.name]) if slope == 0.0 else self._node("LeakyRelu", [x.name], alpha=float(slope))
        return _FeatureMap(out, x.channels, x.spatial)

    def _transposed_conv(self, x: _FeatureMap, prefix: str, channels: int, stride: tuple[int, ...]) -> _FeatureMap:
        weight = self._param(f"{prefix}.weight", (x.channels, channels, *stride))
        inputs = [x.name, weight]
        if self.spec.conv_bias:
            inputs.append(self._param(f"{prefix}.bias", (channels,)))
        out = self._node(
            "ConvTranspose",
            inputs,
            dilations=[1] * len(stride),
            group=1,
            kernel_shape=list(stride),
            pads=[0] * (2 * len(stride)),
            strides=list(stride),
        )
        return _FeatureMap(out, channels, tuple(n * s for n, s in zip(x.spatial, stride)))

    def _conv_node(
        self,
        x: _FeatureMap,
        weight: str,
        bias: str | None,
        kernel: Sequence[int],
        stride: Sequence[int],
        channels: int,
        output: str | None = None,
    ) -> _FeatureMap:
        """torch's ConvNd with padding (k - 1) // 2 on both sides, as dynamic_network_architectures sets it."""
        pads = [(k - 1) // 2 for k in kernel]
        out = self._node(
            "Conv",
            [x.name, weight] + ([bias] if bias else []),
            output=output,
            dilations=[1] * len(kernel),
            group=1,
            kernel_shape=list(kernel),
            pads=pads + pads,
            strides=list(stride),
        )
        spatial = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.spatial, pads, kernel, stride))
        if any(n < 1 for n in spatial):
            raise ModelError(
                f"plans.json's patch_size {list(self.spec.patch_size)} is too small for the network's strides: use the "
                "plans.json the model was trained with."
            )
        return _FeatureMap(out, channels, spatial)

    # -- graph primitives ---------------------------------------------------------------------

    def _node(self, op: str, inputs: list[str], output: str | None = None, **attributes: Any) -> str:
        self._counter += 1
        name = output or f"/{op}_{self._counter}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=f"{op}_{self._counter}", **attributes))
        return name

    def _constant(self, value: np.ndarray) -> str:
        self._counter += 1
        name = f"const_{self._counter}"
        self.constants[name] = value
        return name

    def _reshaped(self, key: str, shape: tuple[int, ...]) -> str:
        name = f"{key}.affine"
        self.affine_params.append((name, key, shape))
        return name

    def _param(self, key: str, shape: tuple[int, ...], aliases: Sequence[str] = ()) -> str:
        """Record a checkpoint tensor the network needs; encoder tensors are also held as decoder.encoder.*."""
        names = list(aliases)
        if key.startswith("encoder."):
            names += [f"decoder.{name}" for name in [key, *aliases]]
        self.params[key] = _Param(tuple(int(n) for n in shape), names)
        return key

    # -- weights ------------------------------------------------------------------------------

    def check_weights(self, weights: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        """Every key the network holds, with its shape, and nothing else; returns the primary float32 arrays."""
        spec = self.spec
        expected: dict[str, tuple[str, tuple[int, ...]]] = {}
        for key, param in self.params.items():
            for name in [key, *param.aliases]:
                expected[name] = (key, param.shape)
        for name in expected:
            if name not in weights:
                raise ModelError(
                    f"{source} has no tensor {name}, which plans.json's {spec.describe()} needs: use the plans.json "
                    "the model was trained with."
                )
        for name in weights:
            if name not in expected:
                raise ModelError(
                    f"{source} has a tensor {name}, which plans.json's {spec.describe()} does not have: use the "
                    "plans.json the model was trained with."
                )
        for name, (_, shape) in expected.items():
            array = weights[name]
            got = tuple(int(n) for n in getattr(array, "shape", ()))
            if got != shape:
                if name.startswith("decoder.seg_layers.") and got[1:] == shape[1:]:
                    raise ModelError(
                        f"{source} has {got[0] if got else 0} output channels ({name}) but dataset.json's labels "
                        f"give {spec.num_segmentation_heads} segmentation heads: use the dataset.json the model was "
                        "trained with."
                    )
                raise ModelError(
                    f"{source} tensor {name} has shape {got}, but plans.json's {spec.describe()} needs {shape}: "
                    "use the plans.json and dataset.json the model was trained with."
                )
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
                raise ModelError(
                    f"{source} tensor {name} holds {getattr(array, 'dtype', type(array).__name__)}, not floats."
                )
        # float16 (and float64) weights load into nnU-Net's float32 network: cast as load_state_dict does.
        primary = {key: weights[key].astype(np.float32, copy=False) for key in self.params}
        for name, (key, _) in expected.items():
            if name != key and not np.array_equal(primary[key], weights[name].astype(np.float32, copy=False)):
                raise ModelError(
                    f"{source} tensor {name} differs from {key}, which torch saves as the same tensor: it is corrupt "
                    "or tampered with; do not use it."
                )
        return primary

    def initializers(self, primary: Mapping[str, np.ndarray]) -> list[TensorProto]:
        used = {name for node in self.nodes for name in node.input}
        tensors = [
            numpy_helper.from_array(np.ascontiguousarray(primary[key]), key) for key in self.params if key in used
        ]
        for name, key, shape in self.affine_params:
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(primary[key]).reshape(shape), name))
        tensors += [numpy_helper.from_array(value, name) for name, value in self.constants.items()]
        return tensors


# --------------------------------------------------------------------------------------------
# Plans parsing helpers
# --------------------------------------------------------------------------------------------


def _known_architecture(class_name: str) -> str:
    """The architecture a network_class_name names, as nnU-Net resolves it (pydoc.locate, then the class
    name within dynamic_network_architectures)."""
    module, _, name = class_name.rpartition(".")
    if name in SUPPORTED_ARCHITECTURES and (not module or module.split(".")[0] == "dynamic_network_architectures"):
        return name
    raise ModelError(
        f"plans.json names architecture {class_name or '(none)'}, which the torch-free graph builder does not know "
        f"(it builds {' and '.join(SUPPORTED_ARCHITECTURES)}): export it with `tsrt export --verify-with-torch` in an "
        "install with torch (pip install 'tsrt[export]')."
    )


def _inherit(configurations: Mapping[str, Any], name: str, visited: tuple[str, ...]) -> dict[str, Any]:
    if name in visited:
        raise ModelError(
            f"plans.json configurations inherit in a circle ({' -> '.join((*visited, name))}): fix plans.json."
        )
    if name not in configurations or not isinstance(configurations[name], Mapping):
        raise ModelError(
            f"plans.json configuration {visited[-1] if visited else name} inherits from {name!r}, which it lacks."
        )
    config = copy.deepcopy(dict(configurations[name]))
    parent = config.get("inherits_from")
    if parent is None:
        return config
    merged = _inherit(configurations, str(parent), (*visited, name))
    merged.update(config)
    return merged


def _convert_old_plans_format(config: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net < 2.4 plans (UNet_class_name, UNet_base_num_features, ...) as ConfigurationManager converts them."""
    try:
        unet = config["UNet_class_name"]
        if unet not in SUPPORTED_ARCHITECTURES:
            _known_architecture(str(unet))
        n_stages = len(config["n_conv_per_stage_encoder"])
        ndim = len(config["patch_size"])
        arch_kwargs = {
            "n_stages": n_stages,
            "features_per_stage": [
                min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n_stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
            "kernel_sizes": copy.deepcopy(config["conv_kernel_sizes"]),
            "strides": copy.deepcopy(config["pool_op_kernel_sizes"]),
            ("n_conv_per_stage" if unet == PLAIN_CONV_UNET else "n_blocks_per_stage"): copy.deepcopy(
                config["n_conv_per_stage_encoder"]
            ),
            "n_conv_per_stage_decoder": copy.deepcopy(config["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError) as err:
        raise ModelError(
            f"plans.json configuration has neither an architecture entry nor the old format's {err}: "
            "use nnU-Net v2's plans.json."
        ) from None
    module = "unet" if unet == PLAIN_CONV_UNET else "residual_unet"
    converted = dict(config)
    converted["architecture"] = {
        "network_class_name": f"dynamic_network_architectures.architectures.{module}.{unet}",
        "arch_kwargs": arch_kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return converted


def _torch_nn_name(value: Any, what: str) -> str | None:
    """The class name of a torch.nn dotted name (torch.nn.X or torch.nn.modules.<file>.X), None for None."""
    if value is None:
        return None
    text = str(value)
    module, _, name = text.rpartition(".")
    if module != "torch.nn" and not module.startswith("torch.nn.modules"):
        raise ModelError(
            f"plans.json's {what} is {text}, which the torch-free graph builder does not know: export the model "
            "with `tsrt export --verify-with-torch` in an install with torch (pip install 'tsrt[export]')."
        )
    return name


def _check_conv_op(value: Any, ndim: int) -> None:
    name = _torch_nn_name(value, "conv_op")
    if name != f"Conv{ndim}d":
        raise ModelError(
            f"plans.json's conv_op is {value}, but its patch_size is {ndim}d (nnU-Net uses Conv{ndim}d): use the "
            "plans.json the model was trained with."
        )


def _instance_norm(norm_op: Any, norm_kwargs: Any, ndim: int) -> tuple[float | None, bool]:
    name = _torch_nn_name(norm_op, "norm_op")
    if name is None:
        return None, False
    if name != f"InstanceNorm{ndim}d":
        raise ModelError(
            f"plans.json's norm_op is {norm_op}, which the torch-free graph builder does not build (it builds "
            f"InstanceNorm{ndim}d): export the model with `tsrt export --verify-with-torch` in an install with torch."
        )
    kwargs = dict(norm_kwargs or {})
    if kwargs.get("track_running_stats"):
        raise ModelError(
            "plans.json's InstanceNorm tracks running statistics, which the torch-free graph builder does not build: "
            "export the model with `tsrt export --verify-with-torch` in an install with torch."
        )
    unknown = sorted(set(kwargs) - {"eps", "affine", "momentum", "track_running_stats"})
    if unknown:
        raise ModelError(
            f"plans.json's norm_op_kwargs has {unknown[0]!r}, which InstanceNorm does not take: fix plans.json."
        )
    return float(kwargs.get("eps", 1e-5)), bool(kwargs.get("affine", False))


def _nonlin_slope(nonlin: Any, nonlin_kwargs: Any) -> float | None:
    name = _torch_nn_name(nonlin, "nonlin")
    kwargs = dict(nonlin_kwargs or {})
    if name is None:
        return None
    if name == "LeakyReLU":
        unknown = sorted(set(kwargs) - {"negative_slope", "inplace"})
        if unknown:
            raise ModelError(
                f"plans.json's nonlin_kwargs has {unknown[0]!r}, which LeakyReLU does not take: fix plans.json."
            )
        return float(kwargs.get("negative_slope", 0.01))
    if name == "ReLU":
        if set(kwargs) - {"inplace"}:
            raise ModelError(
                f"plans.json's nonlin_kwargs has {sorted(set(kwargs) - {'inplace'})[0]!r}, which ReLU does not take."
            )
        return 0.0
    raise ModelError(
        f"plans.json's nonlin is {nonlin}, which the torch-free graph builder does not build (it builds LeakyReLU "
        "and ReLU): export the model with `tsrt export --verify-with-torch` in an install with torch."
    )


def _has_dropout(dropout_op: Any) -> bool:
    name = _torch_nn_name(dropout_op, "dropout_op")
    if name is None:
        return False
    if "Dropout" not in name:
        raise ModelError(f"plans.json's dropout_op is {dropout_op}, which is not a dropout: fix plans.json.")
    return True  # identity at inference, but it shifts the all_modules indices of the state_dict


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and int(v) > 0 for v in value):
        raise ModelError(f"plans.json's {what} is {value!r:.60}, not a list of positive integers: fix plans.json.")
    return [int(v) for v in value]


def _positive_int(value: Any, what: str) -> int:
    if not _is_int(value) or int(value) < 1:
        raise ModelError(f"plans.json's {what} is {value!r:.60}, not a positive integer: fix plans.json.")
    return int(value)


def _per_stage_raw(value: Any, count: int, what: str) -> list[Any]:
    if _is_int(value):
        return [value] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ModelError(
            f"plans.json's arch_kwargs.{what} has {len(value) if isinstance(value, (list, tuple)) else 'no'} "
            f"entries, but the network has {count}: fix plans.json."
        )
    return list(value)


def _per_stage(value: Any, count: int, what: str) -> tuple[int, ...]:
    return tuple(_positive_int(v, f"arch_kwargs.{what}") for v in _per_stage_raw(value, count, what))


def _per_axis(value: Any, ndim: int, what: str) -> tuple[int, ...]:
    if _is_int(value):
        value = [value] * ndim
    if not isinstance(value, (list, tuple)) or len(value) != ndim:
        raise ModelError(
            f"plans.json's arch_kwargs.{what} entry {value!r:.40} does not have {ndim} axes: fix plans.json."
        )
    return tuple(_positive_int(v, f"arch_kwargs.{what}") for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _labels(dataset_json: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or "background" not in labels:
        raise ModelError(
            "dataset.json has no labels with a background: use the dataset.json the model was trained with."
        )
    return labels


def _values(label: Any) -> list[int]:
    return [int(v) for v in label] if isinstance(label, (list, tuple)) else [int(label)]


def _value_info(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


__all__ = [
    "BATCH_AXIS_NAME",
    "BUILDER_NAME",
    "GRAPH_INPUT_NAME",
    "GRAPH_OUTPUT_NAME",
    "NetworkSpec",
    "OPSET",
    "SUPPORTED_ARCHITECTURES",
    "TWO_LEVEL_NORM_MIN_VOXELS",
    "build_graph",
    "build_graph_from_weights",
    "has_regions",
    "network_spec",
    "num_input_channels",
    "num_segmentation_heads",
    "resolve_configuration",
    "save_graph",
]
