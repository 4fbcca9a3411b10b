"""The export toolchain: nnU-Net v2 result folders -> verified ONNX graphs + recorded plans.

Result folders are real ones written by nnU-Net's own trainer classes (tsrt_export.fixtures) with
tiny networks; an independent oracle, nnU-Net's predictor loading the same folder, checks the graphs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tsrt.errors import ModelError
from tsrt.models.plan import load_model_plans, read_plan
from tsrt.models.store import sha256_file
from tsrt_export import onnx_export
from tsrt_export.fixtures import write_result_folder
from tsrt_export.onnx_export import export_model
from tsrt_export.verify import compare_logits

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EXAMPLE_CT = SHARED_DATA / "example_ct_sm.nii.gz"
REPO = Path(__file__).resolve().parents[2]


def _verify_image() -> Path | None:
    return EXAMPLE_CT if EXAMPLE_CT.is_file() else None


def _run_graph(graph: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _predictor_network(folder: Path, fold: str) -> torch.nn.Module:
    """The oracle: the network nnU-Net's own predictor builds and loads for this fold."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(fold,))
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    return predictor.network.eval()


def _assert_matches_predictor(folder: Path, out_dir: Path, fold: str, tolerance_fraction: float = 1e-4) -> None:
    plan = read_plan(out_dir / f"fold_{fold}.plan.json")
    x = np.random.default_rng(7).standard_normal((3, plan.num_input_channels, *plan.patch_size), dtype=np.float32)
    with torch.no_grad():
        expected = _predictor_network(folder, fold)(torch.from_numpy(x)).numpy()
    got = _run_graph(plan.graph_path, x)
    assert got.shape == expected.shape == (3, plan.num_segmentation_heads, *plan.patch_size)
    assert np.abs(got - expected).max() <= tolerance_fraction * (expected.max() - expected.min())


def _assert_nothing_written(out_dir: Path, before: set[str] | None = None) -> None:
    if before is None:
        assert not out_dir.exists()
    else:
        assert {p.name for p in out_dir.iterdir()} == before
    assert not [p for p in out_dir.parent.iterdir() if ".tsrt-export-" in p.name], "staging folder left behind"


@pytest.fixture(scope="module")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nnUNet_results")


@pytest.fixture(scope="module")
def plain_folder(tiny_result_folder: Path) -> Path:
    """The session's 3d PlainConvUNet folder (read-only: tests that break it work on a copy)."""
    return tiny_result_folder


@pytest.fixture(scope="module")
def plain_export(plain_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("exported") / "plain"
    plan_paths = export_model(plain_folder, out_dir, verify_image=_verify_image(), progress=False)
    assert plan_paths == [out_dir / "fold_0.plan.json"]
    return out_dir


# ---------------------------------------------------------------------------------------------
# Successful exports
# ---------------------------------------------------------------------------------------------


def test_plain_3d_plan_records_plans_dataset_and_checkpoint(plain_folder: Path, plain_export: Path) -> None:
    plan = read_plan(plain_export / "fold_0.plan.json")
    plans = json.loads((plain_folder / "plans.json").read_text())
    dataset = json.loads((plain_folder / "dataset.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert plan.dataset_name == plans["dataset_name"]
    assert (plan.plans_name, plan.configuration) == ("nnUNetPlans", "3d_fullres")
    assert (plan.trainer, plan.fold, plan.graph_precision) == ("nnUNetTrainer", "0", "fp32")
    assert plan.network_class == config["architecture"]["network_class_name"]
    assert plan.image_reader_writer == plans["image_reader_writer"] and plan.file_ending == dataset["file_ending"]
    assert plan.transpose_forward == plans["transpose_forward"]
    assert plan.transpose_backward == plans["transpose_backward"]
    assert plan.spacing == config["spacing"] and plan.patch_size == config["patch_size"]
    assert plan.normalization_schemes == config["normalization_schemes"]
    assert plan.use_mask_for_norm == config["use_mask_for_norm"]
    assert plan.foreground_intensity_properties_per_channel == plans["foreground_intensity_properties_per_channel"]
    assert plan.resampling_data.function == config["resampling_fn_data"]
    assert plan.resampling_data.kwargs == config["resampling_fn_data_kwargs"]
    assert plan.resampling_probabilities.kwargs == config["resampling_fn_probabilities_kwargs"]
    assert plan.resampling_seg.kwargs == config["resampling_fn_seg_kwargs"]
    assert plan.labels == dataset["labels"] and plan.regions_class_order is None
    assert plan.channel_names == dataset["channel_names"] and plan.num_input_channels == 1
    assert plan.num_segmentation_heads == len(dataset["labels"])
    assert plan.allowed_mirroring_axes == [0, 1, 2]
    assert (plan.graph_input_name, plan.graph_output_name) == ("input", "logits")
    assert plan.checkpoint_file == f"{plain_folder.name}/fold_0/checkpoint_final.pth"
    assert plan.checkpoint_sha256 == sha256_file(plain_folder / "fold_0" / "checkpoint_final.pth")
    assert plan.graph_sha256 == sha256_file(plan.graph_path)
    assert set(plan.versions) >= {"torch", "nnunetv2", "onnx", "onnxruntime", "tsrt"}
    assert "not installed" not in plan.versions.values()


def test_plain_3d_graph_has_dynamic_batch_static_patch_and_embedded_plan(plain_export: Path) -> None:
    plan = read_plan(plain_export / "fold_0.plan.json")
    model = onnx.load(str(plan.graph_path))
    input_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    output_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert input_dims == ["batch", 1, *plan.patch_size]
    assert output_dims == ["batch", plan.num_segmentation_heads, *plan.patch_size]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    metadata = {p.key: p.value for p in model.metadata_props}
    embedded = json.loads(metadata["tsrt_plan"])
    assert embedded == {**plan.to_dict(), "graph_sha256": ""}
    assert json.loads(metadata["tsrt_verification"])["passed"] is True


def test_plain_3d_graph_equals_nnunet_predictor_network(plain_folder: Path, plain_export: Path) -> None:
    _assert_matches_predictor(plain_folder, plain_export, "0")


def test_verification_report_covers_random_and_real_patch(plain_export: Path) -> None:
    report = json.loads((plain_export / "fold_0.verify.json").read_text())
    names = [case["name"] for case in report["cases"]]
    # the two random tiles went through ORT as one batch of 2: the dynamic batch axis is exercised
    assert names == ["random[0]", "random[1]"] + (["image"] if _verify_image() else [])
    if _verify_image() is None:
        pytest.skip(f"{EXAMPLE_CT} is absent, so the real-patch verification was not run")
    for case in report["cases"]:
        assert case["passed"] and case["confident_disagreements"] == 0
        assert 0 < case["max_abs_diff"] <= case["tolerance"] == pytest.approx(1e-3 * case["logit_range"])
        assert case["agreement"] > 0.999


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        # full-resolution maps of 48*48*32 >= 2**16 voxels take the two-level InstanceNorm path
        ("resenc", {"architecture": "ResidualEncoderUNet", "patch_size": (48, 48, 32)}),
        ("2d", {"configuration": "2d", "patch_size": (64, 64), "spacing": (3.0, 3.0)}),
        ("regions", {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}),
        ("two_channels", {"channel_names": {"0": "CT", "1": "noNorm"}}),
    ],
)
def test_variant_exports_and_matches_predictor(
    name: str, kwargs: dict, results_root: Path, tmp_path: Path
) -> None:
    folder = write_result_folder(results_root, dataset_id=910 + len(name), dataset_name=name.title(), **kwargs)
    (plan_path,) = export_model(folder, tmp_path / "out", verify_image=_verify_image(), progress=False)
    plan = read_plan(plan_path)
    if name == "2d":
        assert plan.ndim == 2 and plan.patch_size == [64, 64] and plan.allowed_mirroring_axes == [0, 1]
    if name == "regions":
        assert plan.regions_class_order == [1, 2] and plan.num_segmentation_heads == 2
        report = json.loads((tmp_path / "out" / "fold_0.verify.json").read_text())
        assert {case["decision"] for case in report["cases"]} == {"sign"}
    if name == "two_channels":
        assert plan.num_input_channels == 2 and plan.normalization_schemes == ["CTNormalization", "NoNormalization"]
    if name == "resenc":
        assert plan.network_class.endswith("ResidualEncoderUNet")
        ops = {node.op_type for node in onnx.load(str(plan.graph_path)).graph.node}
        assert {"ReduceSum", "InstanceNormalization"} <= ops  # two-level norms at full resolution, native below
    _assert_matches_predictor(folder, tmp_path / "out", "0")


def test_five_folds_export_each_folds_own_weights(results_root: Path, tmp_path: Path) -> None:
    folder = write_result_folder(results_root, dataset_id=920, dataset_name="FiveFolds", folds=range(5))
    plan_paths = export_model(folder, tmp_path / "out", progress=False)
    assert [p.name for p in plan_paths] == [f"fold_{f}.plan.json" for f in range(5)]
    plans = load_model_plans(tmp_path / "out")  # the runtime's check that the folds can be ensembled
    assert len({plan.graph_sha256 for plan in plans}) == 5
    for fold in ("0", "4"):
        _assert_matches_predictor(folder, tmp_path / "out", fold)
    subset = export_model(folder, tmp_path / "subset", folds=[3], progress=False)
    assert [p.name for p in (tmp_path / "subset").glob("*.plan.json")] == ["fold_3.plan.json"]
    assert subset == [tmp_path / "subset" / "fold_3.plan.json"]


def test_totalsegmentator_trainer_name_is_recorded(results_root: Path, tmp_path: Path) -> None:
    folder = write_result_folder(
        results_root, dataset_id=921, dataset_name="TsTrainer", trainer="nnUNetTrainer_4000epochs_NoMirroring",
        mirror_axes=None,
    )
    (plan_path,) = export_model(folder, tmp_path / "out", progress=False)
    plan = read_plan(plan_path)
    assert plan.trainer == "nnUNetTrainer_4000epochs_NoMirroring"
    assert plan.allowed_mirroring_axes is None  # NoMirroring trainers: the runtime must not mirror


def _rename_trainer(folder: Path, trainer: str) -> Path:
    """The same weights, as if trained by a trainer class this machine does not have."""
    renamed = folder.with_name(folder.name.replace("nnUNetTrainer", trainer, 1))
    folder.rename(renamed)
    for checkpoint_path in renamed.glob("fold_*/checkpoint_final.pth"):
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = trainer
        torch.save(checkpoint, checkpoint_path)
    return renamed


def test_unknown_trainer_falls_back_to_plans_architecture_with_warning(
    results_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = write_result_folder(results_root, dataset_id=922, dataset_name="Custom")
    folder = _rename_trainer(_copy_folder(original, tmp_path), "MyLabTrainerXYZ")
    with caplog.at_level(logging.WARNING, logger="tsrt_export.onnx_export"):
        (plan_path,) = export_model(folder, tmp_path / "out", progress=False)
    assert any("MyLabTrainerXYZ" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert read_plan(plan_path).trainer == "MyLabTrainerXYZ"
    _assert_matches_predictor(original, tmp_path / "out", "0")  # the same weights under nnU-Net's own trainer


def test_fp16_graph_keeps_float32_io_and_instance_norm(results_root: Path, tmp_path: Path) -> None:
    # ResEnc at 48*48*32: two-level and native norms plus the average-pooling skips, all kept in float32
    folder = write_result_folder(
        results_root, dataset_id=930, dataset_name="Half", architecture="ResidualEncoderUNet", patch_size=(48, 48, 32)
    )
    (plan_path,) = export_model(folder, tmp_path / "out", fp16=True, verify_image=_verify_image(), progress=False)
    plan = read_plan(plan_path)
    assert plan.graph_precision == "fp16"
    model = onnx.load(str(plan.graph_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    weight_types = {init.data_type for init in model.graph.initializer if init.name in conv_weights}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    typed = onnx.shape_inference.infer_shapes(model)
    value_types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    float32_kinds = {"InstanceNormalization", "ReduceSum", "AveragePool"}
    float32_ops = [node for node in model.graph.node if node.op_type in float32_kinds]
    assert {node.op_type for node in float32_ops} == float32_kinds
    assert {value_types[node.input[0]] for node in float32_ops} == {onnx.TensorProto.FLOAT}
    report = json.loads((tmp_path / "out" / "fold_0.verify.json").read_text())
    assert report["graph_precision"] == "fp16" and report["passed"]
    for case in report["cases"]:
        assert case["tolerance"] == pytest.approx(2e-2 * case["logit_range"])
        assert case["max_abs_diff"] > 1e-5  # really computed in half precision
        assert case["agreement"] > 0.99


def test_graph_that_disagrees_with_torch_fails_and_writes_nothing(
    plain_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real float32 graph differs from torch by ~1e-5 of the logit range; a zero tolerance must fail.
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE_FRACTION", 0.0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("existing content")
    with pytest.raises(ModelError, match="disagrees with torch"):
        export_model(plain_folder, out_dir, progress=False)
    _assert_nothing_written(out_dir, {"keep.txt"})


@pytest.mark.parametrize("spatial", [(64, 64, 64), (32, 24, 96), (256, 256)])
def test_two_level_instance_norm_equals_torch_instance_norm(spatial: tuple[int, ...]) -> None:
    norm_class = torch.nn.InstanceNorm3d if len(spatial) == 3 else torch.nn.InstanceNorm2d
    norm = norm_class(6, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, *spatial) * 3 + torch.linspace(-20, 20, 6).reshape(1, 6, *[1] * len(spatial))
    with torch.no_grad():
        assert torch.allclose(onnx_export._TwoLevelInstanceNorm(norm)(x), norm(x), atol=1e-4)


def test_compare_logits_flags_confident_argmax_flips_only() -> None:
    reference = np.zeros((1, 3, 2, 2, 2), dtype=np.float32)
    reference[:, 0] = 10.0  # background wins everywhere by a wide margin
    reference[0, 1, 0, 0, 0] = 9.9999  # a near tie at one voxel
    tie_flip = reference.copy()
    tie_flip[0, 1, 0, 0, 0] = 10.0001
    report = compare_logits("tie", reference, tie_flip, tolerance_fraction=1e-3, has_regions=False)
    assert report.passed and report.disagreeing_voxels == 1 and report.confident_disagreements == 0
    confident_flip = reference.copy()
    confident_flip[0, 2, 1, 1, 1] = 10.005
    report = compare_logits("flip", reference, confident_flip, tolerance_fraction=1e-3, has_regions=False)
    assert not report.passed and report.confident_disagreements == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one actionable ModelError, nothing half-written
# ---------------------------------------------------------------------------------------------


def _copy_folder(folder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "results" / folder.name
    shutil.copytree(folder, copy)
    return copy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a torch checkpoint" * 100)


def _add_label(folder: Path) -> None:
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["liver"] = len(dataset["labels"])
    (folder / "dataset.json").write_text(json.dumps(dataset))


def _unknown_architecture(folder: Path) -> None:
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_lab.nets.FancyUNet"
    (folder / "plans.json").write_text(json.dumps(plans))


@pytest.mark.parametrize(
    ("breakage", "folds", "message"),
    [
        (lambda folder: None, [1], r"Fold\(s\) 1 have no checkpoint_final.pth"),
        (lambda folder: _corrupt(folder / "fold_0" / "checkpoint_final.pth"), None, "corrupt or truncated"),
        (lambda folder: _truncate(folder / "fold_0" / "checkpoint_final.pth"), None, "corrupt or truncated"),
        (_add_label, None, "has 4 output channels but dataset.json's labels give 5 segmentation heads"),
        (_unknown_architecture, None, "Cannot build network my_lab.nets.FancyUNet"),
        (lambda folder: (folder / "plans.json").unlink(), None, "has no plans.json"),
        (lambda folder: (folder / "dataset.json").write_text("{"), None, "dataset.json is not valid JSON"),
        (lambda folder: (folder / "fold_0").rename(folder / "fold_all"), None, "pass --fold all to export fold_all"),
    ],
    ids=["missing_fold", "corrupt_checkpoint", "truncated_checkpoint", "labels_mismatch", "unknown_architecture",
         "no_plans", "bad_dataset_json", "only_fold_all"],
)
def test_bad_result_folder_raises_one_actionable_model_error(
    breakage, folds, message: str, plain_folder: Path, tmp_path: Path
) -> None:
    folder = _copy_folder(plain_folder, tmp_path)
    breakage(folder)
    out_dir = tmp_path / "out"
    with pytest.raises(ModelError, match=message) as caught:
        export_model(folder, out_dir, folds=folds, progress=False)
    assert "\n" not in str(caught.value) and str(caught.value).rstrip().endswith(".")
    _assert_nothing_written(out_dir)


def test_failure_in_a_later_fold_leaves_earlier_folds_unwritten(results_root: Path, tmp_path: Path) -> None:
    original = write_result_folder(results_root, dataset_id=923, dataset_name="TwoFolds", folds=(0, 1))
    folder = _copy_folder(original, tmp_path)
    _add_label(folder)  # every fold now disagrees with dataset.json; fold 0 fails first
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelError):
        export_model(folder, out_dir, progress=False)
    _assert_nothing_written(out_dir, set())


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_export_writes_plans(plain_folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tsrt.cli.root import app

    result = CliRunner().invoke(app, ["export", str(plain_folder), str(tmp_path / "out"), "--fold", "0"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "out" / "fold_0.plan.json") in result.output
    assert read_plan(tmp_path / "out" / "fold_0.plan.json").fold == "0"


def test_cli_export_error_is_one_line_and_runtime_import_stays_torch_free(tmp_path: Path) -> None:
    script = (
        "import sys; import tsrt.cli; assert 'torch' not in sys.modules, 'tsrt.cli imported torch'; "
        "sys.argv = ['tsrt', 'export', sys.argv[1], sys.argv[2]]; tsrt.cli.main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == ModelError.exit_code, result.stderr
    assert result.stderr.strip().startswith("tsrt: error:") and "has no plans.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_export_takes_segments_output_option_and_nnunets_fold_list(plain_folder: Path, tmp_path: Path) -> None:
    """`tsrt export MODEL -o OUT -f 0 1 2` (segment's -o, nnU-Net's -f list); the positional OUT still works."""
    from typer.testing import CliRunner

    from tsrt.cli.root import app, totalsegmentator_argv

    assert totalsegmentator_argv(["export", "M", "-o", "O", "-f", "0", "1", "2"]) == [
        "export", "M", "-o", "O", "-f", "0", "-f", "1", "-f", "2"
    ]
    assert totalsegmentator_argv(["segment", "-f", "ct.nii.gz", "-o", "x"])[:3] == ["segment", "-f", "ct.nii.gz"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, totalsegmentator_argv(["export", str(plain_folder), "-o", str(out), "-f", "0"]))
    assert result.exit_code == 0, result.output
    assert read_plan(out / "fold_0.plan.json").fold == "0"
    both = CliRunner().invoke(app, ["export", str(plain_folder), str(out), "-o", str(tmp_path / "other")])
    assert both.exit_code != 0 and "Give the output folder once" in str(both.exception)
