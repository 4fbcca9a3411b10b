"""The torch-free graph builder (tsrt.models.onnx_graph) against the torch exporter, variant by variant.

Every architecture variant tsrt_export.fixtures writes (real nnU-Net result folders, checkpoints saved
by torch in nnU-Net's format), checkpoints with other arch_kwargs built by nnU-Net's own network builder,
fp16/bf16 weights and the trained demo model: the graph built from the restricted reader's arrays and
the graph of `tsrt_export.onnx_export.export_model` give the same logits on ONNX Runtime, within the
exporter's own float32 tolerance (they are built op for op alike, so the measured difference is 0).
Broken plans/checkpoint pairs stop with one line naming the key or the architecture, and a subprocess
in which torch cannot be imported reads a checkpoint and builds a graph.
"""

from __future__ import annotations

import collections
import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tsrt.errors import ModelError
from tsrt.models.checkpoint import read_checkpoint
from tsrt.models.onnx_graph import (
    BATCH_AXIS_NAME,
    BUILDER_NAME,
    GRAPH_INPUT_NAME,
    GRAPH_OUTPUT_NAME,
    OPSET,
    build_graph,
    build_graph_from_weights,
    network_spec,
    save_graph,
)

torch = pytest.importorskip("torch", reason="the torch exporter is the reference the builder is compared with")
pytest.importorskip("nnunetv2", reason="the fixture generator needs the export extra (torch, nnunetv2)")

from tsrt_export.fixtures import write_result_folder  # noqa: E402
from tsrt_export.onnx_export import export_model  # noqa: E402
from tsrt_export.verify import FP32_TOLERANCE_FRACTION, compare_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = Path("fold_0") / "checkpoint_final.pth"

#: The architecture variants tsrt_export.fixtures writes (write_result_folder keyword arguments).
FIXTURE_VARIANTS: dict[str, dict[str, Any]] = {
    "plain_3d_4_stages": {"n_stages": 4, "patch_size": (32, 32, 32)},
    # 64^3 = 262144 voxels at full resolution: the exporter's two-level InstanceNorm path
    "plain_3d_5_stages": {"n_stages": 5, "patch_size": (64, 64, 64)},
    # 6 stages; spacing (3, 1, 1) gives nnU-Net's anisotropic [1, 3, 3] kernels and [1, 2, 2] strides first
    "plain_3d_6_stages_anisotropic": {
        "n_stages": 6,
        "patch_size": (32, 128, 128),
        "spacing": (3.0, 1.0, 1.0),
        "features": (2, 4, 8, 8, 8, 8),
    },
    "anisotropic_5mm": {"spacing": (5.0, 0.7, 0.7), "patch_size": (8, 32, 32)},
    "resenc_3d": {"architecture": "ResidualEncoderUNet", "patch_size": (48, 48, 32)},
    "resenc_2d": {"architecture": "ResidualEncoderUNet", "configuration": "2d", "patch_size": (64, 64)},
    "plain_2d_two_level_norm": {"configuration": "2d", "patch_size": (256, 256), "spacing": (1.0, 1.0)},
    "regions": {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        "regions_class_order": (1, 2, 3),
    },
    "two_input_channels": {"channel_names": {"0": "CT", "1": "T2"}},
    "intensity_bands_without_norm": {
        "intensity_bands": {"spleen": (0.0, 100.0), "kidney_left": (300.0, 500.0)},
        "features": (8, 16, 32),
    },
}

#: Other arch_kwargs than the planners write, built by nnU-Net's get_network_from_plans (see _rebuilt_folder).
EDITED_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain_nonlin_first_relu_slope_no_bias_no_affine_dropout": (
        {"n_stages": 3, "patch_size": (48, 48, 32)},
        {
            "nonlin_first": True,
            "nonlin_kwargs": {"negative_slope": 0.2, "inplace": True},
            "conv_bias": False,
            "norm_op_kwargs": {"eps": 1e-3, "affine": False},
            "dropout_op": "torch.nn.Dropout3d",
            "dropout_op_kwargs": {"p": 0.3},
            "n_conv_per_stage": [1, 2, 3],
            "n_conv_per_stage_decoder": [1, 2],
        },
    ),
    "resenc_relu_stem_channels_eps": (
        {"architecture": "ResidualEncoderUNet", "n_stages": 3, "patch_size": (32, 32, 32)},
        {
            "nonlin": "torch.nn.ReLU",
            "nonlin_kwargs": {"inplace": True},
            "stem_channels": 3,
            "conv_bias": False,
            "norm_op_kwargs": {"eps": 1e-4, "affine": True},
            "n_blocks_per_stage": [2, 1, 2],
            "n_conv_per_stage_decoder": [2, 1],
            "dropout_op": "torch.nn.Dropout3d",
            "dropout_op_kwargs": {"p": 0.2},
        },
    ),
}

#: Dataset ids of the folders this module writes (unique, so no two variants share a folder).
_DATASET_IDS = {
    name: 930 + index
    for index, name in enumerate(
        [*FIXTURE_VARIANTS, *EDITED_VARIANTS, "half_float16", "half_bfloat16", "builder_checks"]
    )
}


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """torch's two-thread CPU kernels spin against other processes on a shared 2-core machine (an instance
    norm took 35 ms instead of 0.2 ms under load); one thread keeps the exports to a fraction of a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graph_results")


def _fixture_folder(results_root: Path, name: str, kwargs: dict[str, Any]) -> Path:
    return write_result_folder(
        results_root, dataset_id=_DATASET_IDS[name], dataset_name=name.title().replace("_", ""), **kwargs
    )


def _run(graph: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _operator_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type not in ("Identity", "Constant"))


def _assert_same_as_torch_export(name: str, folder: Path, out: Path) -> None:
    """Export with the torch exporter, build without torch, and compare interface and logits."""
    (plan_path,) = export_model(folder, out / "torch", folds=["0"], progress=False)
    torch_graph = out / "torch" / "fold_0.onnx"
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    checkpoint = read_checkpoint(folder / CHECKPOINT)
    built = save_graph(build_graph(plans, dataset_json, checkpoint.configuration, checkpoint), out / "built.onnx")

    ours, theirs = onnx.load(str(built)), onnx.load(str(torch_graph))
    assert ours.producer_name == BUILDER_NAME and theirs.producer_name == "pytorch"
    assert (
        [(o.domain, o.version) for o in ours.opset_import]
        == [("", OPSET)]
        == [(o.domain, o.version) for o in theirs.opset_import]
    )
    assert ours.ir_version == theirs.ir_version
    for mine, reference in ((ours.graph.input, theirs.graph.input), (ours.graph.output, theirs.graph.output)):
        assert [v.name for v in mine] == [v.name for v in reference]
        assert [v.type.tensor_type.elem_type for v in mine] == [v.type.tensor_type.elem_type for v in reference]
    assert ours.graph.input[0].name == GRAPH_INPUT_NAME and ours.graph.output[0].name == GRAPH_OUTPUT_NAME
    assert _dims(ours.graph.input[0]) == _dims(theirs.graph.input[0])
    assert _dims(ours.graph.input[0])[0] == BATCH_AXIS_NAME
    assert _dims(ours.graph.output[0])[:2] == _dims(theirs.graph.output[0])[:2]
    # The same operators (torch's Identity aliases of equal initializers and Constant nodes aside), so the
    # two-level norms, pools and activations are where the exporter puts them.
    assert _operator_counts(ours) == _operator_counts(theirs)

    spec = network_spec(plans, dataset_json, checkpoint.configuration)
    x = np.random.default_rng(3).standard_normal((2, spec.num_input_channels, *spec.patch_size), dtype=np.float32)
    reference, candidate = _run(torch_graph, x), _run(built, x)
    report = compare_logits(
        name, reference, candidate, tolerance_fraction=FP32_TOLERANCE_FRACTION, has_regions=spec.has_regions
    )
    print(
        f"{name}: max|Δ| {report.max_abs_diff:.3g} "
        f"(logit range {report.logit_range:.3g}, tolerance {report.tolerance:.3g})"
    )
    assert report.passed, report.summary()
    assert report.agreement == 1.0


@pytest.mark.parametrize("name", list(FIXTURE_VARIANTS))
def test_fixture_variant_equals_torch_export(name: str, results_root: Path, tmp_path: Path) -> None:
    folder = _fixture_folder(results_root, name, FIXTURE_VARIANTS[name])
    _assert_same_as_torch_export(name, folder, tmp_path)


def test_demo_model_equals_torch_export(demo_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "demo" / demo_checkpoint.parent.parent.name
    shutil.copytree(demo_checkpoint.parent.parent, folder)  # the export must not write into the repository
    _assert_same_as_torch_export("demo", folder, tmp_path / "out")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_equal_torch_export(dtype: str, results_root: Path, tmp_path: Path) -> None:
    """nnU-Net loads fp16/bf16 weights into its float32 network; both paths cast the same way."""
    source = _fixture_folder(results_root, f"half_{dtype}", {"patch_size": (32, 32, 32)})
    folder = tmp_path / "results" / source.parent.name / source.name
    shutil.copytree(source, folder)
    checkpoint = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = collections.OrderedDict(
        (k, v.to(getattr(torch, dtype))) for k, v in checkpoint["network_weights"].items()
    )
    torch.save(checkpoint, folder / CHECKPOINT)
    assert read_checkpoint(folder / CHECKPOINT).network_weights["decoder.seg_layers.1.bias"].dtype == (
        np.float16 if dtype == "float16" else np.float32
    )
    _assert_same_as_torch_export(f"{dtype}_weights", folder, tmp_path / "out")


def _rebuilt_folder(source: Path, target: Path, arch_changes: dict[str, Any], seed: int = 0) -> Path:
    """A copy of a result folder whose plans use other arch_kwargs, with a checkpoint of the network
    nnU-Net builds from them (get_network_from_plans, deep supervision on as in training), seeded weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    shutil.copytree(source, target)
    plans = json.loads((target / "plans.json").read_text())
    dataset_json = json.loads((target / "dataset.json").read_text())
    configuration = next(iter(plans["configurations"]))
    architecture = plans["configurations"][configuration]["architecture"]
    architecture["arch_kwargs"].update(arch_changes)
    (target / "plans.json").write_text(json.dumps(plans, indent=2))
    plans_manager = PlansManager(plans)
    num_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    num_heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = get_network_from_plans(
            architecture["network_class_name"],
            architecture["arch_kwargs"],
            architecture["_kw_requires_import"],
            num_inputs,
            num_heads,
            allow_init=True,
            deep_supervision=True,
        )
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))
    checkpoint = torch.load(target / CHECKPOINT, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = network.state_dict()
    checkpoint["init_args"]["plans"] = plans
    torch.save(checkpoint, target / CHECKPOINT)
    return target


@pytest.mark.parametrize("name", list(EDITED_VARIANTS))
def test_other_arch_kwargs_equal_torch_export(name: str, results_root: Path, tmp_path: Path) -> None:
    fixture_kwargs, arch_changes = EDITED_VARIANTS[name]
    source = _fixture_folder(results_root, name, fixture_kwargs)
    folder = _rebuilt_folder(source, tmp_path / "results" / source.parent.name / source.name, arch_changes)
    _assert_same_as_torch_export(name, folder, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# plans.json forms nnU-Net accepts
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_folder(results_root: Path) -> Path:
    """The fixtures' default: 3d PlainConvUNet, 3 stages of 4/8/16 features, 32^3, 4 heads (read-only)."""
    return _fixture_folder(results_root, "builder_checks", {})


def _read(folder: Path) -> tuple[dict, dict, Any]:
    return (
        json.loads((folder / "plans.json").read_text()),
        json.loads((folder / "dataset.json").read_text()),
        read_checkpoint(folder / CHECKPOINT),
    )


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
def test_old_plans_format_builds_the_same_graph(plain_folder: Path) -> None:
    """nnU-Net < 2.4 plans (UNet_class_name, ...) are converted as nnU-Net's ConfigurationManager does."""
    plans, dataset_json, checkpoint = _read(plain_folder)
    old = copy.deepcopy(plans)
    config = old["configurations"]["3d_fullres"]
    kwargs = config.pop("architecture")["arch_kwargs"]
    config.update(
        {
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": kwargs["features_per_stage"][0],
            "unet_max_num_features": kwargs["features_per_stage"][-1],
            "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
            "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
            "num_pool_per_axis": [2, 2, 2],
            "pool_op_kernel_sizes": kwargs["strides"],
            "conv_kernel_sizes": kwargs["kernel_sizes"],
        }
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    converted = PlansManager(old).get_configuration("3d_fullres").network_arch_init_kwargs
    assert converted["features_per_stage"] == kwargs["features_per_stage"]  # the old plans mean the same network
    new_graph = build_graph(plans, dataset_json, "3d_fullres", checkpoint)
    old_graph = build_graph(old, dataset_json, "3d_fullres", checkpoint)
    assert network_spec(old, dataset_json, "3d_fullres") == network_spec(plans, dataset_json, "3d_fullres")
    assert old_graph.SerializeToString() == new_graph.SerializeToString()


def test_inherits_from_is_resolved(plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    plans["configurations"]["3d_child"] = {"inherits_from": "3d_fullres", "batch_size": 7}
    plans["configurations"]["3d_grandchild"] = {"inherits_from": "3d_child"}
    assert network_spec(plans, dataset_json, "3d_grandchild") == network_spec(plans, dataset_json, "3d_fullres")
    build_graph(plans, dataset_json, "3d_grandchild", checkpoint)
    plans["configurations"]["3d_fullres"]["inherits_from"] = "3d_grandchild"
    with pytest.raises(ModelError, match="inherit in a circle"):
        network_spec(plans, dataset_json, "3d_child")


@pytest.mark.parametrize(
    "dataset_json",
    [
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}},
        {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": {"background": 0, "a": 1, "ignore": 2}},
        {"modality": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "a": 1, "b": 3}},
        {
            "channel_names": {"0": "T1"},
            "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3, "ignore": 4},
            "regions_class_order": [1, 2, 3],
        },
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "x": [1, 2], "y": [2], "only_background": [0, 0]},
            "regions_class_order": [1, 2],
        },
    ],
)
def test_channels_and_heads_follow_nnunet(dataset_json: dict) -> None:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from tsrt.models.onnx_graph import has_regions, num_input_channels, num_segmentation_heads

    labels = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    assert num_segmentation_heads(dataset_json) == labels.num_segmentation_heads
    assert has_regions(dataset_json) == labels.has_regions
    names = dataset_json.get("modality", dataset_json.get("channel_names"))
    assert num_input_channels(dataset_json) == len(names)


# --------------------------------------------------------------------------------------------
# Broken plans/checkpoint pairs: one line naming what is wrong
# --------------------------------------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo[ModelError]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize(
    "class_name",
    ["dynamic_network_architectures.architectures.unet.UNetPlusPlus", "my_lab.networks.PlainConvUNet", "Primus"],
)
def test_unknown_architecture_points_at_tsrt_export(class_name: str, plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = class_name
    with pytest.raises(ModelError) as caught:
        build_graph(plans, dataset_json, "3d_fullres", checkpoint)
    message = _one_line(caught)
    assert f"names architecture {class_name}," in message and "`tsrt export --verify-with-torch`" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"norm_op": "torch.nn.modules.batchnorm.BatchNorm3d"}, "norm_op is torch.nn.modules.batchnorm.BatchNorm3d"),
        ({"nonlin": "torch.nn.GELU"}, "nonlin is torch.nn.GELU"),
        ({"conv_op": "torch.nn.modules.conv.Conv2d"}, "conv_op is torch.nn.modules.conv.Conv2d"),
        ({"squeeze_excitation": True}, "argument 'squeeze_excitation'"),
        ({"strides": [[1, 1, 1], [2, 2, 2]]}, "arch_kwargs.strides has 2 entries, but the network has 3"),
    ],
)
def test_unsupported_arch_kwargs_are_one_line(change: dict, expected: str, plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(change)
    with pytest.raises(ModelError) as caught:
        build_graph(plans, dataset_json, "3d_fullres", checkpoint)
    assert expected in _one_line(caught)


def test_plans_that_disagree_with_the_checkpoint_name_the_tensor(plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][1] = 12
    with pytest.raises(ModelError) as caught:
        build_graph(plans, dataset_json, "3d_fullres", checkpoint)
    message = _one_line(caught)
    assert "tensor encoder.stages.1.0.convs.0.conv.weight has shape (8, 4, 3, 3, 3)" in message
    assert "needs (12, 4, 3, 3, 3)" in message


def test_labels_that_disagree_with_the_checkpoint_name_the_head_count(plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    dataset_json["labels"]["liver"] = len(dataset_json["labels"])
    with pytest.raises(ModelError) as caught:
        build_graph(plans, dataset_json, "3d_fullres", checkpoint)
    assert "has 4 output channels (decoder.seg_layers.0.weight) but dataset.json's labels give 5" in _one_line(caught)


def _edited_checkpoint(folder: Path, target: Path, edit) -> Path:
    """A real checkpoint (torch.save, nnU-Net's format) whose network weights `edit` changed."""
    checkpoint = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    edit(checkpoint["network_weights"])
    torch.save(checkpoint, target)
    return target


def _build_from(folder: Path, checkpoint_path: Path) -> onnx.ModelProto:
    plans, dataset_json, _ = _read(folder)
    checkpoint = read_checkpoint(checkpoint_path)
    return build_graph(plans, dataset_json, "3d_fullres", checkpoint)


def test_checkpoint_tensor_of_the_wrong_shape(plain_folder: Path, tmp_path: Path) -> None:
    key = "decoder.stages.0.convs.1.conv.weight"

    def widen(weights: dict) -> None:
        for name in (key, "decoder.stages.0.convs.1.all_modules.0.weight"):
            weights[name] = torch.zeros(16, 16, 3, 3, 3)

    with pytest.raises(ModelError) as caught:
        _build_from(plain_folder, _edited_checkpoint(plain_folder, tmp_path / "wide.pth", widen))
    assert f"tensor {key} has shape (16, 16, 3, 3, 3)" in _one_line(caught)


def test_checkpoint_missing_a_tensor(plain_folder: Path, tmp_path: Path) -> None:
    key = "encoder.stages.1.0.convs.0.norm.bias"
    with pytest.raises(ModelError) as caught:
        _build_from(plain_folder, _edited_checkpoint(plain_folder, tmp_path / "m.pth", lambda w: w.pop(key)))
    assert f"has no tensor {key}, which plans.json's PlainConvUNet" in _one_line(caught)


def test_checkpoint_with_an_extra_tensor(plain_folder: Path, tmp_path: Path) -> None:
    key = "decoder.attention.0.weight"

    def add(weights: dict) -> None:
        weights[key] = torch.zeros(3)

    with pytest.raises(ModelError) as caught:
        _build_from(plain_folder, _edited_checkpoint(plain_folder, tmp_path / "x.pth", add))
    assert f"has a tensor {key}, which plans.json's PlainConvUNet" in _one_line(caught)


def test_checkpoint_alias_that_differs_from_its_tensor(plain_folder: Path, tmp_path: Path) -> None:
    """torch saves encoder.* and decoder.encoder.* from one tensor: different values mean tampering."""
    key = "decoder.encoder.stages.0.0.convs.0.conv.bias"

    def detach(weights: dict) -> None:
        weights[key] = weights[key].clone() + 1.0

    with pytest.raises(ModelError) as caught:
        _build_from(plain_folder, _edited_checkpoint(plain_folder, tmp_path / "a.pth", detach))
    assert f"tensor {key} differs from encoder.stages.0.0.convs.0.conv.bias" in _one_line(caught)


def test_weights_are_validated_before_any_array_is_used(plain_folder: Path) -> None:
    plans, dataset_json, checkpoint = _read(plain_folder)
    weights = dict(checkpoint.network_weights)
    weights["decoder.seg_layers.1.weight"] = weights["decoder.seg_layers.1.weight"].astype(np.int32)
    spec = network_spec(plans, dataset_json, "3d_fullres")
    with pytest.raises(ModelError, match="decoder.seg_layers.1.weight holds int32, not floats"):
        build_graph_from_weights(spec, weights)


# --------------------------------------------------------------------------------------------
# No torch at all
# --------------------------------------------------------------------------------------------


def test_reads_and_builds_with_torch_unimportable(plain_folder: Path, tmp_path: Path) -> None:
    """In a fresh interpreter where `import torch` fails, read a real checkpoint, build, save and run."""
    graph = tmp_path / "no_torch.onnx"
    script = textwrap.dedent(f"""
        import json, sys
        BLOCKED = ("torch", "nnunetv2", "dynamic_network_architectures", "tsrt_export")
        for name in BLOCKED:
            sys.modules[name] = None  # import of these raises ImportError
        from pathlib import Path
        from tsrt.models.checkpoint import read_checkpoint
        from tsrt.models.onnx_graph import build_graph, save_graph
        folder = Path({str(plain_folder)!r})
        checkpoint = read_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
        model = build_graph(json.loads((folder / "plans.json").read_text()),
                            json.loads((folder / "dataset.json").read_text()), checkpoint.configuration, checkpoint)
        save_graph(model, Path({str(graph)!r}))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
        print(json.dumps(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

    export_model(plain_folder, tmp_path / "torch", progress=False)
    x = np.random.default_rng(5).standard_normal((1, 1, 32, 32, 32), dtype=np.float32)
    assert np.abs(_run(graph, x) - _run(tmp_path / "torch" / "fold_0.onnx", x)).max() <= 1e-6
