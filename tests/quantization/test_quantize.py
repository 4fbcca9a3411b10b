"""`tsrt models quantize`: int8 QDQ graphs calibrated on scans by tsrt's own pipeline, installed only when they
segment held-out scans like fp32 (or with --force), and run by `--precision int8`.

Models: a torch-free "banded" network (built here with tsrt's graph builder from numpy weights: its logits are
linear in the voxel's own intensity, so its labels have wide margins, as trained networks' confident voxels
do) and the bundled demo model. Scans: small phantoms (tsrt.demo.phantom) and an all-air volume, which
calibrates the activation ranges to nothing, so the gate must refuse what it produces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest

from seeded_nets import plain_unet_plans

from tsrt.api import segment
from tsrt.demo.phantom import make_phantom
from tsrt.demo.run import demo_model_dir
from tsrt.models.onnx_graph import build_graph_from_weights, network_spec, save_graph, state_dict_for, weight_shapes
from tsrt.models.plan import read_plan
from tsrt.models.store import sha256_file
from tsrt.quantization.calibration import scans_sha256
from tsrt.quantization.gate import CLASS_DICE, LARGE_CLASS_VOXELS, MEAN_DICE, MEAN_MIN_VOXELS
from tsrt.quantization.install import REPORT_FILE, model_dir_targets, quantize
from tsrt.version import __version__

#: The banded model's classes by intensity (HU): background below -400 (air, lungs), soft tissue (fat, body,
#: liver, spleen, kidneys: -95..190 HU) and contrast/bone (aorta, vertebrae: >= 240 HU); lower bounds.
BANDS = {"soft_tissue": -400.0, "dense": 235.0}
SPACING = (3.0, 3.0, 3.0)


def _tsrt(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSRT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True, env=env
    )


def _one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tsrt: error: ") and message in lines[0], result.stderr


def _files(folder: Path) -> dict[str, str]:
    """Every file of a folder (hidden ones too) by name, with its sha256."""
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three calibration phantoms, one held-out phantom (varied anatomy), one all-air volume; 3 mm voxels."""
    folder = tmp_path_factory.mktemp("scans")
    made: dict[str, list[Path]] = {"calibration": [], "validation": []}
    for seed in (11, 12, 13, 14):  # the held-out one smaller: the gate segments it twice
        phantom = make_phantom(shape=(56, 48, 40) if seed == 14 else (64, 56, 48), spacing=SPACING, seed=seed, vary=True)
        path = folder / f"phantom_{seed}.nii.gz"
        nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), path)
        made["validation" if seed == 14 else "calibration"].append(path)
    air = folder / "air.nii.gz"  # with a scanner's noise: a constant volume is refused as no anatomy
    noise = np.random.default_rng(0).integers(-3, 4, size=(64, 56, 48))
    nib.save(nib.Nifti1Image((noise - 1000).astype(np.int16), np.diag([*SPACING, 1.0])), air)
    made["air"] = [air]
    return made


def write_banded_model(folder: Path) -> Path:
    """An exported model (graph + plan, the demo model's CT normalisation) whose logits are linear in the
    voxel's normalised intensity f, class k's line crossing class k-1's at BANDS' k-th threshold.

    A PlainConvUNet without norms: the first conv makes f + 2 (> 0, so LeakyReLU keeps it), the next convs
    and the last decoder stage's skip path pass it on, deeper paths are zero, the head draws the lines. The
    encoder's weights reach their convs through Identity nodes, as in graphs torch's exporter writes.
    """
    labels = {"background": 0, **{name: k for k, name in enumerate(BANDS, start=1)}}
    plans = plain_unet_plans([32, 32, 32], instance_norm=False)
    spec = network_spec(plans, {"channel_names": {"0": "CT"}, "labels": labels}, "3d_fullres")
    weights = {name: np.zeros(shape, np.float32) for name, shape in weight_shapes(spec).items()}
    centre = (1, 1, 1)
    weights["encoder.stages.0.0.convs.0.conv.weight"][(0, 0, *centre)] = 1.0
    weights["encoder.stages.0.0.convs.0.conv.bias"][0] = 2.0
    weights["encoder.stages.0.0.convs.1.conv.weight"][(0, 0, *centre)] = 1.0
    weights["decoder.stages.1.convs.0.conv.weight"][(0, 4, *centre)] = 1.0  # [upsampled (4), skip (4)]: the skip's f
    weights["decoder.stages.1.convs.1.conv.weight"][(0, 0, *centre)] = 1.0
    plan = json.loads((demo_model_dir() / "fold_0.plan.json").read_text())
    properties = plan["foreground_intensity_properties_per_channel"]["0"]

    def f(hu: float) -> float:
        clipped = min(max(hu, properties["percentile_00_5"]), properties["percentile_99_5"])
        return (clipped - properties["mean"]) / properties["std"] + 2.0

    gain, bias = 20.0, 0.0
    for k, threshold in enumerate(BANDS.values(), start=1):
        bias -= gain * f(threshold)
        weights["decoder.seg_layers.1.weight"][k, 0] = gain * k
        weights["decoder.seg_layers.1.bias"][k] = bias
    folder.mkdir(parents=True)
    network = build_graph_from_weights(spec, state_dict_for(spec, weights))
    # As torch's exporter writes shared weights (encoder.* = decoder.encoder.*): an Identity of the initializer.
    for node in [node for node in network.graph.node if node.op_type == "Conv" and node.input[1].startswith("encoder.")]:
        alias = f"{node.input[1]}.alias"
        network.graph.node.insert(0, onnx.helper.make_node("Identity", [node.input[1]], [alias]))
        node.input[1] = alias
    graph = save_graph(network, folder / "fold_0.onnx")
    plan.update(
        dataset_name="Dataset990_Bands", trainer="nnUNetTrainer", labels=labels, num_segmentation_heads=len(labels),
        patch_size=[32, 32, 32], spacing=list(SPACING), graph_sha256=sha256_file(graph), graph_builder="test",
        checkpoint_file="nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/none", checkpoint_sha256="",
        network_class=plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"],
        allowed_mirroring_axes=None,
    )
    (folder / "fold_0.plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))
    return folder


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, scans: dict[str, list[Path]]):
    """The banded model quantized on the phantoms and gated on the held-out one (no --force)."""
    model = write_banded_model(tmp_path_factory.mktemp("gated") / "banded")
    fp32_graph = sha256_file(model / "fold_0.onnx")
    [outcome] = quantize(model_dir_targets(model), scans["calibration"], scans["validation"], max_tiles=8, show_progress=False)
    return model, outcome, fp32_graph


def test_quantize_installs_a_qdq_graph_its_plan_records_and_a_report(gated, scans) -> None:
    model, outcome, fp32_graph = gated
    assert outcome.installed and outcome.gate.passed, outcome.gate.failures
    graph = model / "fold_0.int8.onnx"
    nodes = onnx.load(str(graph)).graph.node
    ops = [node.op_type for node in nodes]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    producers = {output: node for node in nodes for output in node.output}
    head = producers["logits"]
    assert head.op_type == "Conv"
    assert all(name not in producers or producers[name].op_type != "DequantizeLinear" for name in head.input), \
        "the output layer is fed dequantized tensors: it was quantized"
    for node in nodes:
        if node.op_type == "ConvTranspose":
            assert producers.get(node.input[1]) is None, "a ConvTranspose weight was quantized"
        elif node.op_type == "Conv" and node is not head:  # int8 weights, also those the fp32 graph aliased
            assert producers[node.input[1]].op_type == "DequantizeLinear", f"{node.name} kept float weights"
    assert sha256_file(model / "fold_0.onnx") == fp32_graph

    plan = read_plan(model / "fold_0.plan.json")
    record = plan.int8
    assert record is not None and plan.int8_graph_path == graph
    assert record["graph_sha256"] == sha256_file(graph) and record["precision"] == "int8"
    assert record["calibration"]["sha256"] == scans_sha256(scans["calibration"])
    assert record["calibration"]["method"] == "percentile" and record["tsrt_version"] == __version__
    report = json.loads((model / REPORT_FILE).read_text())
    assert record["gate"]["passed"] and not record["gate"]["forced"] and report["installed"]
    assert record["gate"]["validation_sha256"] == scans_sha256(scans["validation"]) == report["validation"]["sha256"]
    for key in ("mean_dice", "min_dice", "agreement"):
        assert record["gate"][key] == report[key]
    # The decision follows from the reported numbers and the thresholds.
    rows = report["per_class"].values()
    assert set(report["per_class"]) == set(BANDS)
    expected = np.mean([row["dice"] for row in rows if row["voxels_fp32"] >= MEAN_MIN_VOXELS]) >= MEAN_DICE and all(
        row["dice"] >= CLASS_DICE for row in rows if row["voxels_fp32"] >= LARGE_CLASS_VOXELS
    )
    assert report["passed"] == expected
    assert report["qdq_nodes"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    assert len(report["seconds"]["fp32"]) == len(report["seconds"]["int8"]) == 1


def test_precision_int8_runs_the_gated_graph_and_agrees_with_fp32(gated, scans, tmp_path) -> None:
    """A run on the held-out scan agrees with fp32 exactly as the gate measured; OpenVINO reads the same graph."""
    model, outcome, _ = gated
    scan = scans["validation"][0]
    out = tmp_path / "int8.nii.gz"
    result = _tsrt("segment", str(scan), "-o", str(out), "--model", str(model), "-q", "--precision", "int8", home=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "int8.tsrt.json").read_text())
    assert (manifest["provider"], manifest["precision"], manifest["request"]["options"]["precision"]) == ("cpu", "int8", "int8")
    int8 = _labels(out)
    fp32 = segment(scan, tmp_path / "fp32.nii.gz", model, provider="cpu", progress=False).labels
    agreement = float(np.mean(fp32 == int8))
    assert agreement == pytest.approx(outcome.report["agreement"], abs=1e-6)
    assert agreement > 0.99 and len(np.unique(int8)) == len(BANDS) + 1
    try:
        import openvino  # noqa: F401
    except ModuleNotFoundError:
        return
    on_openvino = segment(scan, tmp_path / "ov.nii.gz", model, provider="openvino", precision="int8", progress=False)
    assert on_openvino.manifest is not None and on_openvino.manifest.precision == "int8"
    assert np.mean(on_openvino.labels == int8) > 0.99


def test_the_gate_refuses_int8_calibrated_on_air_and_changes_nothing(scans, tmp_path) -> None:
    model = write_banded_model(tmp_path / "banded")
    before = _files(model)
    result = _tsrt("models", "quantize", str(model), "-c", str(scans["air"][0]), "--validation",
                   str(scans["validation"][0]), "--tiles", "4", "-q", home=tmp_path)
    _one_line_error(result, "int8 refused by the accuracy gate")
    assert "--force" in result.stderr
    assert _files(model) == before  # graphs and plan byte for byte, no int8 graph, no report, no temp file


def test_force_installs_what_the_gate_refused_and_says_so(scans, tmp_path) -> None:
    model = write_banded_model(tmp_path / "banded")
    [outcome] = quantize(model_dir_targets(model), scans["air"], scans["validation"], force=True, max_tiles=8, show_progress=False)
    gate = read_plan(model / "fold_0.plan.json").int8["gate"]
    report = json.loads((model / REPORT_FILE).read_text())
    assert outcome.installed and not outcome.gate.passed
    assert gate["forced"] and not gate["passed"] and gate["failures"] == outcome.gate.failures
    assert report["forced"] and report["installed"] and not report["passed"]
    run = segment(scans["validation"][0], tmp_path / "seg.nii.gz", model, precision="int8", progress=False)
    assert run.manifest is not None and run.manifest.precision == "int8"


def test_precision_int8_without_a_gated_graph_is_one_line(gated, scans, tmp_path) -> None:
    """No int8 graph (demo model; a task), or one whose bytes are not what the gate passed: one line, nothing written."""
    model, _, _ = gated
    tampered = tmp_path / "tampered"
    shutil.copytree(model, tampered)
    with open(tampered / "fold_0.int8.onnx", "ab") as graph:
        graph.write(b"\0")
    scan = str(scans["validation"][0])
    cases = [
        (("--model", str(demo_model_dir())), f"tsrt models quantize {demo_model_dir()} --calibration SCANS"),
        (("--fast", "--offline"), "tsrt models quantize total --fast --calibration SCANS"),
        (("--model", str(tampered)), "not the one its plan's gate passed"),
    ]
    for flags, message in cases:
        out = tmp_path / "out.nii.gz"
        result = _tsrt("segment", scan, "-o", str(out), *flags, "--precision", "int8", home=tmp_path / "empty_home")
        _one_line_error(result, message)
        assert not out.exists() and not list(tmp_path.glob("*.tsrt.json"))
    demo = _tsrt("demo", "-o", str(tmp_path / "demo"), "--precision", "int8", home=tmp_path / "empty_home")
    _one_line_error(demo, "tsrt models quantize")
    assert not (tmp_path / "demo").exists()  # refused before the phantom is written


def test_quantize_runs_without_torch(scans, tmp_path) -> None:
    """The runtime-only situation: torch, nnU-Net and the export toolchain cannot be imported, and nothing the
    quantize command loads pulls them in (ONNX Runtime's quantization needs only onnx and onnxruntime)."""
    model = write_banded_model(tmp_path / "banded")
    blocked = ("torch", "torchvision", "nnunetv2", "dynamic_network_architectures", "tsrt_export", "totalsegmentator")
    script = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # importing it raises ImportError
        from tsrt.cli.root import main
        sys.argv = ["tsrt", "models", "quantize", {str(model)!r}, "-c", {str(scans["calibration"][0])!r},
                    "--validation", {str(scans["validation"][0])!r}, "--force", "--tiles", "4", "-q"]
        try:
            main()
        except SystemExit as stop:
            if stop.code:
                raise
        loaded = [m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None]
        assert not loaded, loaded
        assert "onnxruntime.quantization" in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TSRT_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert read_plan(model / "fold_0.plan.json").int8_graph_path is not None


def test_int8_runs_on_the_cpu_only() -> None:
    """ONNX Runtime CPU and OpenVINO run the QDQ graph; CUDA is refused, and `auto` takes the CPU (TensorRT builds
    engines from it: tests/engines/test_tensorrt.py)."""
    from tsrt.engines.providers import check_precision, choose_provider
    from tsrt.errors import ProviderError

    with pytest.raises(ProviderError, match="runs on the CPU"):
        check_precision("cuda", "int8")
    assert choose_provider("auto", precision="int8").name == "cpu"


def test_a_task_is_quantized_model_by_model_and_runs_in_int8(small_task_store: Path, scans, tmp_path) -> None:
    """`tsrt models quantize total --fast` in a store (fixture weights: random, so the gate's verdict is the
    weights', hence --force), then `tsrt models list` and `--precision int8` see it."""
    from tsrt.models.registry import get_task
    from tsrt.models.store import model_dir

    home = tmp_path / "home"
    shutil.copytree(small_task_store, home)
    [part] = get_task("total", fast=True).required_models
    folder = model_dir(part, home / "models")
    plan_before = (folder / "fold_0.plan.json").read_bytes()
    result = _tsrt("models", "quantize", "total", "--fast", "-c", str(scans["calibration"][0]), "--validation",
                   str(scans["validation"][0]), "--tiles", "2", "--force", "-q", home=home)
    assert result.returncode == 0, result.stderr
    record = read_plan(folder / "fold_0.plan.json").int8
    assert record is not None and (folder / record["graph_file"]).exists() and (folder / REPORT_FILE).exists()
    assert plan_before != (folder / "fold_0.plan.json").read_bytes()
    listing = _tsrt("models", "list", "--models", home=home)
    assert listing.returncode == 0 and ("gated" in listing.stdout or "forced" in listing.stdout), listing.stdout
    out = tmp_path / "seg"
    run = _tsrt("segment", str(scans["validation"][0]), "-o", str(out), "--fast", "--offline", "--precision", "int8",
                "-q", home=home)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "tsrt_manifest.json").read_text())["precision"] == "int8"
    fastest = _tsrt("segment", str(scans["validation"][0]), "-o", str(tmp_path / "seg2"), "--fastest", "--offline",
                    "--precision", "int8", home=home)
    _one_line_error(fastest, "tsrt models quantize total --fastest --calibration SCANS")
