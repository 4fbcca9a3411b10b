"""The one command that proves tsrt's GPU paths on a machine with an NVIDIA GPU.

    python benchmarks/gpu_check.py                # on a GPU machine: installs nothing
    python benchmarks/gpu_check.py --cpu-only     # the same machinery on the CPU rows only (CI runs this)

Runs the bundled demo model and a TotalSegmentator-sized network (6 stages, 32..320 features, 118
classes, 128^3 tiles; seeded weights built torch-free), each as an exported model folder in a temp
folder, on `cpu` (the reference, fp32; and int8) and on `cuda` (fp32) and `tensorrt` (fp32, fp16, int8).
int8 is tsrt's own: each model is quantized by `tsrt models quantize --tensorrt` (calibrated on phantoms, gated
on a held-out one and installed even when refused, the verdict in the row's note; the seeded network's Dice
measures arithmetic noise, not anatomy), and TensorRT engines are built by `tsrt engine build --precision P` for every
TensorRT row and then found by the run as `--provider tensorrt --precision P` finds them. For each row it
asserts the provider ONNX Runtime actually ran (tsrt refuses a silent fallback), and reports seconds per
tile, end-to-end seconds (demo model: a phantom through tsrt's pipeline), peak GPU memory (nvidia-smi)
and agreement with the CPU fp32 result (Dice per class, mean). Results: benchmarks/results/gpu_check.{json,md}.

On a machine without an NVIDIA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
#: The CPU rows, the first the reference: (provider, precision).
CPU_ROWS = (("cpu", "fp32"), ("cpu", "int8"))
#: The rows after the CPU rows.
GPU_ROWS = (("cuda", "fp32"), ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8"))
#: The end-to-end phantom (3 mm voxels) and the held-out phantom that gates the demo model's int8 graph.
PHANTOM_SHAPE = (112, 96, 80)
#: TotalSegmentator's `total` networks: nnU-Net's 3d_fullres plan for 1.5 mm CT, 117 classes + background.
TOTALSEG_SIZED = dict(features=(32, 64, 128, 256, 320, 320), patch=(128, 128, 128), heads=118)
SEED = 0


@dataclass
class Row:
    """One model on one provider and precision."""

    model: str
    provider: str
    precision: str
    provider_used: str = ""
    seconds_per_tile: float | None = None
    end_to_end_seconds: float | None = None
    peak_gpu_mb: float | None = None
    mean_dice_vs_cpu: float | None = None
    voxel_agreement_vs_cpu: float | None = None
    note: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- the machine


def gpu_names() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (empty when there is no driver or no GPU)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.startswith("GPU")] if listed.returncode == 0 else []


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    wanted = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512f", "avx2")
    return {
        "gpus": gpu_names(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu_flags": [flag for flag in wanted if f" {flag}" in flags],
        "python": platform.python_version(),
    }


class GpuMemorySampler:
    """Peak GPU memory of this process, from nvidia-smi every 200 ms (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(os.getpid()) and used.strip().isdigit():
                    self.peak_mb = max(self.peak_mb or 0.0, float(used))
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemorySampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------- the models


def totalseg_sized_model(folder: Path) -> Path:
    """The TotalSegmentator-sized network as an exported model folder (the demo model's plan and normalisation,
    118 classes, 128^3 patches), so `tsrt engine build` and the runtime treat it as any model."""
    from tsrt.demo.run import demo_model_dir
    from tsrt.models.store import sha256_file

    model = folder / "totalseg_sized"
    model.mkdir(parents=True)
    graph = totalseg_sized_graph(model)
    plan = json.loads((demo_model_dir() / "fold_0.plan.json").read_text())
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, TOTALSEG_SIZED["heads"])}}
    plan.update(
        dataset_name="Dataset999_TotalsegSized", labels=labels, num_segmentation_heads=TOTALSEG_SIZED["heads"],
        patch_size=list(TOTALSEG_SIZED["patch"]), graph_file=graph.name, graph_sha256=sha256_file(graph),
        graph_builder="benchmarks/gpu_check.py", checkpoint_sha256="", allowed_mirroring_axes=None,
    )
    (model / "fold_0.plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))
    return model


def totalseg_sized_graph(folder: Path) -> Path:
    """A TotalSegmentator-sized PlainConvUNet with seeded weights, built without torch."""
    from tsrt.models.onnx_graph import build_graph_from_weights, network_spec, save_graph, state_dict_for, weight_shapes

    features = list(TOTALSEG_SIZED["features"])
    n = len(features)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]],
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = {"configurations": {"3d_fullres": {"architecture": arch, "patch_size": list(TOTALSEG_SIZED["patch"])}}}
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, TOTALSEG_SIZED["heads"])}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels}
    spec = network_spec(plans, dataset, "3d_fullres")
    rng = np.random.default_rng(SEED)
    weights = {}
    for name, shape in weight_shapes(spec).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        weights[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32) if len(shape) > 1 \
            else np.ones(shape, np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32)
    path = folder / "totalseg_sized.onnx"
    network = build_graph_from_weights(spec, state_dict_for(spec, weights), source="The seeded network")
    save_graph(network, path)
    return path


def dice_per_class(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Dice of each label present in either map (background excluded)."""
    scores = []
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == 0:
            continue
        x, y = a == label, b == label
        scores.append(2.0 * float(np.logical_and(x, y).sum()) / float(x.sum() + y.sum()))
    return scores


def write_phantoms(folder: Path, shape: tuple[int, int, int]) -> dict[str, list[Path]]:
    """Calibration phantoms (three) and a held-out one for the int8 gate, as NIfTI files."""
    import nibabel as nib

    from tsrt.demo.phantom import make_phantom

    scans: dict[str, list[Path]] = {"calibration": [], "validation": []}
    for seed in (31, 32, 33, 34):
        phantom = make_phantom(shape=shape, spacing=(3.0, 3.0, 3.0), seed=seed, vary=True)
        path = folder / f"phantom_{seed}.nii.gz"
        nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), path)
        scans["validation" if seed == 34 else "calibration"].append(path)
    return scans


def quantize_for_tensorrt(model_dir: Path, scans: dict[str, list[Path]], tiles: int, *, method: str,
                          force: bool) -> str:
    """Install the model's int8 graph in TensorRT's form, as `tsrt models quantize --tensorrt` does; the gate's verdict."""
    from tsrt.quantization.install import model_dir_targets, quantize

    [outcome] = quantize(model_dir_targets(model_dir), scans["calibration"], scans["validation"], method=method,
                         force=force, max_tiles=tiles, show_progress=False, form="tensorrt")
    gate = outcome.report
    verdict = "gate passed" if outcome.gate.passed else "gate refused, forced"
    return f"int8: {verdict} (mean Dice {gate['mean_dice']:.4f}, agreement {100 * gate['agreement']:.2f} %)"


def build_engines_for(model_dir: Path, rows: list[tuple[str, str]]) -> None:
    """`tsrt engine build MODEL --precision P` for every TensorRT row (timed: building is minutes per engine)."""
    from tsrt.engines.tensorrt import build_engines

    for provider, precision in rows:
        if provider == "tensorrt":
            started = time.perf_counter()
            cache = build_engines(model_dir, precision=precision)
            print(f"  engine {model_dir.name} {precision}: {time.perf_counter() - started:.0f} s ({cache.name})", flush=True)


def session_for(model_dir: Path, provider: str, precision: str):
    """A tsrt session on `provider` for the model's fp32 or gated int8 graph; TensorRT with the engines
    `tsrt engine build` made for `precision` (tensorrt_choice: what `--provider tensorrt` runs). Creation itself
    refuses a provider ONNX Runtime could not start."""
    from tsrt.engines.providers import choose_provider, create_session
    from tsrt.engines.tensorrt import tensorrt_choice
    from tsrt.models.plan import load_model_plans
    from tsrt.pipeline.infer import check_int8_model

    [plan] = load_model_plans(model_dir)
    graph = check_int8_model(model_dir)[0] if precision == "int8" else plan.graph_path
    if provider == "tensorrt":
        choice = tensorrt_choice(model_dir, precision)
    else:
        choice = choose_provider(provider, precision=precision)
    session = create_session(graph, choice)
    if session.provider_name != provider:
        raise SystemExit(f"gpu_check: asked for {provider}, ONNX Runtime ran {session.provider_name}")
    return session


def time_tiles(session, tiles: np.ndarray) -> tuple[float, np.ndarray]:
    """Median seconds per tile after one warm-up tile, and the argmax of every tile."""
    name = session.get_inputs()[0].name if hasattr(session, "get_inputs") else "input"
    session.run(None, {name: tiles[:1]})  # warm-up (TensorRT loads its engine here)
    seconds, labels = [], []
    for tile in tiles:
        started = time.perf_counter()
        logits = session.run(None, {name: tile[None]})[0]
        seconds.append(time.perf_counter() - started)
        labels.append(np.argmax(logits[0], axis=0).astype(np.uint8))
    return float(np.median(seconds)), np.stack(labels)


def check_model(name: str, model_dir: Path, tiles: np.ndarray, rows: list[tuple[str, str]],
                end_to_end=None, int8_note: str = "") -> list[Row]:
    """Every row of one model, the first being the CPU fp32 reference."""
    results: list[Row] = []
    reference: np.ndarray | None = None
    reference_e2e: np.ndarray | None = None
    for provider, precision in rows:
        row = Row(name, provider, precision, note=int8_note if precision == "int8" else "")
        with GpuMemorySampler() as memory:
            session = session_for(model_dir, provider, precision)
            row.provider_used = session.provider_name
            row.seconds_per_tile, labels = time_tiles(session, tiles)
            if end_to_end is not None:
                started = time.perf_counter()
                e2e_labels = end_to_end(provider, precision)
                row.end_to_end_seconds = time.perf_counter() - started
        row.peak_gpu_mb = memory.peak_mb
        if reference is None:
            reference, reference_e2e = labels, (e2e_labels if end_to_end is not None else None)
        compared_to = (reference_e2e, e2e_labels) if end_to_end is not None else (reference, labels)
        scores = dice_per_class(*compared_to)
        row.mean_dice_vs_cpu = float(np.mean(scores)) if scores else 1.0
        row.voxel_agreement_vs_cpu = float((compared_to[0] == compared_to[1]).mean())
        results.append(row)
        print(f"  {name:16s} {provider:9s} {precision:5s} {row.seconds_per_tile:7.3f} s/tile  "
              f"Dice {row.mean_dice_vs_cpu:.4f}", flush=True)
    return results


def demo_end_to_end(model_dir: Path, shape: tuple[int, int, int] = PHANTOM_SHAPE):
    """The demo phantom through tsrt's whole pipeline on one provider: the label map."""
    from tsrt.api import segment_image_with_model
    from tsrt.demo.phantom import make_phantom
    from tsrt.pipeline.infer import InferenceSettings, load_model
    from tsrt.pipeline.read import Image

    phantom = make_phantom(shape=shape, spacing=(3.0, 3.0, 3.0), seed=4242, vary=True)

    def run(provider: str, precision: str) -> np.ndarray:
        image = Image(array=phantom.image, affine=phantom.affine, header=None, source="demo phantom")
        model = load_model(model_dir, provider=provider, precision=precision)  # TensorRT: the engines built for it
        if model.provider_used != provider or model.precision_used != precision:
            raise SystemExit(f"gpu_check: asked for {provider} {precision}, the run used "
                             f"{model.provider_used} {model.precision_used}")
        return segment_image_with_model(image, model, InferenceSettings(progress=False)).labels

    return run


# --------------------------------------------------------------------------------------------- report


def markdown(report: Report) -> str:
    lines = [
        "# GPU check", "",
        f"GPUs: {', '.join(report.machine['gpus']) or 'none'}; ONNX Runtime {report.machine['onnxruntime']}; "
        f"CPU flags: {', '.join(report.machine['cpu_flags']) or 'none seen'}", "",
        "| model | provider | precision | ran on | s/tile | end-to-end s | peak GPU MB | mean Dice vs cpu | agreement | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        cells = [r.model, r.provider, r.precision, r.provider_used,
                 f"{r.seconds_per_tile:.3f}" if r.seconds_per_tile is not None else "",
                 f"{r.end_to_end_seconds:.1f}" if r.end_to_end_seconds is not None else "",
                 f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "",
                 f"{r.mean_dice_vs_cpu:.4f}" if r.mean_dice_vs_cpu is not None else "",
                 f"{100 * r.voxel_agreement_vs_cpu:.2f} %" if r.voxel_agreement_vs_cpu is not None else "", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="Run only the CPU rows (tests the machinery).")
    parser.add_argument("--tiles", type=int, default=3, help="Timed tiles per row (after one warm-up tile).")
    parser.add_argument("--skip-totalseg-sized", action="store_true", help="Only the demo model (quick).")
    parser.add_argument("--skip-int8", action="store_true", help="No int8 rows (no quantization).")
    parser.add_argument("--calibration-tiles", type=int, default=8, help="Calibration tiles per model (int8).")
    parser.add_argument("--phantom-shape", default=",".join(map(str, PHANTOM_SHAPE)),
                        help="Voxels (x,y,z, 3 mm) of the end-to-end and calibration phantoms.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for gpu_check.json and gpu_check.md.")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    gpus = gpu_names()
    if not args.cpu_only:
        if not gpus:
            print("gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none): nothing to check.")
            return 0
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(f"gpu_check: {gpus[0]} is here but this onnxruntime has no CUDA provider: "
                  "pip install 'tsrt[tensorrt]' (onnxruntime-gpu), then run again.", file=sys.stderr)
            return 1
    rows = list(CPU_ROWS) + ([] if args.cpu_only else list(GPU_ROWS))
    if args.skip_int8:
        rows = [row for row in rows if row[1] != "int8"]
    shape = tuple(int(n) for n in args.phantom_shape.split(","))
    report = Report(machine=machine_info())
    from tsrt.demo.run import demo_model_dir

    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="tsrt-gpu-check-") as temp:
        folder = Path(temp)
        scans = write_phantoms(folder, shape) if any(precision == "int8" for _, precision in rows) else {}
        demo = folder / "demo"
        shutil.copytree(demo_model_dir(), demo, ignore=shutil.ignore_patterns("engines"))
        note = quantize_for_tensorrt(demo, scans, args.calibration_tiles, method="percentile", force=True) if scans else ""
        build_engines_for(demo, rows)
        demo_tiles = rng.normal(size=(args.tiles, 1, 64, 64, 64)).astype(np.float32)
        report.rows += check_model("demo", demo, demo_tiles, rows, demo_end_to_end(demo, shape), note)
        if not args.skip_totalseg_sized:
            model = totalseg_sized_model(folder)
            note = quantize_for_tensorrt(model, scans, 2, method="minmax", force=True) if scans else ""
            build_engines_for(model, rows)
            tiles = rng.normal(size=(args.tiles, 1, *TOTALSEG_SIZED["patch"])).astype(np.float32)
            report.rows += check_model("totalseg-sized", model, tiles, rows, int8_note=note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"machine": report.machine,
                                                         "rows": [asdict(r) for r in report.rows]}, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
