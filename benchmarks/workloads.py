"""What the benchmarks run: workloads, backends as (engine, precision) rows, and their cached set-up.

    python benchmarks/workloads.py                          # list the workloads and the rows each runs
    python benchmarks/workloads.py --prepare ct_fast        # build its weights, exports, int8 graphs and input

Shared by speed.py, accuracy.py, cold_start.py and backends.py, so every script measures the same
inputs on the same weights. Weights are TotalSegmentator-sized networks (6 stages, 32..320 features,
128^3 patches, the real class counts) with seeded random weights in TotalSegmentator's layout
(tsrt_export.fixtures), or "confident" ones (the trained demo model's backbone), imported into a tsrt
store with the same export `tsrt models import` runs. Set-up is slow (minutes per task), so it is
cached in the work folder and reused by later runs.

tsrt rows are (provider, precision) pairs, as `tsrt segment --provider P --precision Q` runs them: which
this machine runs is decided from its CPU flags and ONNX Runtime's providers (select_tsrt_rows), and every
row left out says why. int8 rows run the gated int8 graphs `tsrt models quantize` installs, made here once
per weights and task (install_int8; calibrated on phantoms: minutes and 7-10 GB per 128^3 model) and cached
in the store with the other set-up. Random weights cannot pass the accuracy gate (their labels are near-ties
everywhere), so their int8 graphs are installed with --force: those rows are for speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory import TreeMemory

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_WORK = Path.home() / ".cache" / "tsrt-bench"
Homes = tuple[Path, Path]  # (TotalSegmentator home, tsrt home)


@dataclass(frozen=True)
class Workload:
    """One input and task, the unit every benchmark measures."""

    name: str
    input: str  # a file/folder in ../shared/data, or "phantom"
    task: str = "total"
    fast: bool = False
    #: Cap on timed runs (then no warm-up): the full `total` task on 128^3 nets takes ~15 min per backend here.
    max_runs: int | None = None

    @property
    def ts_tasks(self) -> tuple[str, ...]:
        return ("total_fast",) if self.fast else ("total",)


WORKLOADS = {
    "ct_fast": Workload("ct_fast", "example_ct.nii.gz", fast=True),
    "ct_total": Workload("ct_total", "example_ct.nii.gz", max_runs=1),
    "dicom_fast": Workload("dicom_fast", "example_ct_dicom", fast=True),
    "dicom_total": Workload("dicom_total", "example_ct_dicom", max_runs=1),
    "phantom_fast": Workload("phantom_fast", "phantom", fast=True, max_runs=1),  # the memory workload
    # A 30-slice crop: smoke tests and trying the script out, not part of the default set.
    "ct_sm_fast": Workload("ct_sm_fast", "example_ct_sm.nii.gz", fast=True),
}
DEFAULT_WORKLOADS = ("ct_fast", "ct_total", "dicom_fast", "dicom_total", "phantom_fast")
#: The demo model's phantom for reduced precision: unseen (training used seeds 0..29), 12 tiles of 64^3.
DEMO_PHANTOM = dict(shape=(112, 96, 80), spacing=(3.0, 3.0, 3.0), seed=4242, vary=True)
#: The large synthetic phantom (memory workload): 512x512x800 voxels at 0.8 mm.
PHANTOM = dict(shape=(512, 512, 800), spacing=(0.8, 0.8, 0.8), seed=7)
#: The providers that run on the CPU (the rest need a GPU build of ONNX Runtime).
CPU_PROVIDERS = ("cpu", "openvino")
#: A tsrt row: (provider, precision), the engine and the arithmetic, as `--provider P --precision Q` asks for them.
TsrtRow = tuple[str, str]
#: Every tsrt row the benchmark knows, in table order; ONNX Runtime's CPU in fp32 first (the reference).
TSRT_ROWS: tuple[TsrtRow, ...] = (
    ("cpu", "fp32"), ("cpu", "int8"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
    ("cuda", "fp32"), ("cuda", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8"),
)
#: CPU flags the report prints: int8 dot products (VNNI), native bf16 (AVX512_BF16, AMX), AMX int8.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
#: int8 calibration and gate scans: phantoms at 3 mm from seeds the demo model did not train on (0..29) and
#: apart from its evaluation phantom (DEMO_PHANTOM). Small on purpose: a few 128^3 tiles per model, since at
#: 128^3 each calibration tile of the TotalSegmentator-sized net costs ~10 s and ~9 GB, and the gate runs
#: the held-out one twice per model (fp32 and int8).
CALIBRATION_PHANTOMS = [dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=seed, vary=True)
                        for seed in (51, 52, 53)]
VALIDATION_PHANTOM = dict(shape=(64, 56, 48), spacing=(3.0, 3.0, 3.0), seed=54, vary=True)
#: Calibration tiles per model on random weights: their int8 rows measure speed only (the ranges do not change
#: the graph's arithmetic, hence its time), so fewer tiles than tsrt's default (32: confident weights, demo).
RANDOM_WEIGHTS_TILES = 8


@dataclass(frozen=True)
class Backend:
    """One row: a backend (official, nnunet, tsrt, tsrt-model) with its provider and precision, in a group."""

    group: str  # totalseg | nnunet
    backend: str
    provider: str = "cpu"
    precision: str = "fp32"
    low_memory: bool = False  # `--low-memory`: the large feature maps in slabs (tsrt.engines.slabs)

    @property
    def label(self) -> str:
        if self.backend == "official":
            return "TotalSegmentator (PyTorch)"
        if self.backend == "nnunet":
            return "nnUNetPredictor (PyTorch)"
        label = ("tsrt --model" if self.backend == "tsrt-model" else "tsrt") + f" {self.provider} {self.precision}"
        return label + (" --low-memory" if self.low_memory else "")

    @property
    def reference(self) -> bool:
        return self.backend in ("official", "nnunet")

    @property
    def tag(self) -> str:
        """The row in file names (job files, logs, outputs)."""
        return f"{self.backend}-{self.provider}-{self.precision}" + ("-lowmem" if self.low_memory else "")


#: Each backend's comparison group: tsrt's task path against official TotalSegmentator, `--model` against nnU-Net.
GROUPS = {"official": "totalseg", "tsrt": "totalseg", "nnunet": "nnunet", "tsrt-model": "nnunet"}


def store_models(work: Path, weights: str, tasks: set[str], small: bool = False) -> Homes:
    """(TotalSegmentator home, tsrt home) holding `tasks` with `weights` (random | confident), cached in work.

    `small`: 4-stage nets on 48^3 patches instead of TotalSegmentator-sized ones (smoke tests only).
    """
    from tsrt.models.registry import get_task
    from tsrt_export.fixtures import find_demo_checkpoint, write_totalseg_home
    from tsrt_export.import_totalseg import import_task

    root = work / (weights + ("-small" if small else ""))
    ts_home, tsrt_home = root / "ts_home", root / "tsrt_home"
    source = find_demo_checkpoint(REPO) if weights == "confident" else None
    if weights == "confident" and source is None:
        raise SystemExit("confident weights need the trained demo checkpoint in models/demo")
    for task_key in sorted(tasks):
        done = root / f".{task_key}.done"
        if done.exists():
            continue
        print(f"[set-up] {weights} weights: {task_key} (fixture + export; cached for later runs)", flush=True)
        write_totalseg_home(ts_home, [task_key], source_checkpoint=source, small=small)
        fast = task_key.endswith("_fast")
        import_task(get_task("total", fast=fast), ts_home, store_root=tsrt_home / "models", progress=False)
        done.touch()
    return ts_home, tsrt_home


def tasks_for(workloads: list[Workload], with_nnunet: bool) -> set[str]:
    """TotalSegmentator tasks the set-up must export: the workloads' own, and --fast's model for nnU-Net rows."""
    return {t for w in workloads for t in w.ts_tasks} | ({"total_fast"} if with_nnunet else set())


def prepare_input(work: Path, workload: Workload) -> Path:
    """The workload's input: a shared test file, or the large phantom (written once into the work folder)."""
    if workload.input != "phantom":
        path = SHARED / workload.input
        if not path.exists():
            raise SystemExit(f"{path} is missing: the benchmark needs ../shared/data")
        return path
    path = work / "inputs" / "phantom_512x512x800_0.8mm.nii.gz"
    if not path.exists():
        import nibabel as nib

        from tsrt.demo.phantom import make_phantom

        print("[set-up] large phantom 512x512x800 at 0.8 mm", flush=True)
        phantom = make_phantom(**PHANTOM)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))  # nibabel needs .nii.gz last
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), partial)
        os.replace(partial, path)
    return path


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def select_tsrt_rows(flags: Collection[str], openvino: bool,
                     ort_providers: Collection[str]) -> tuple[list[TsrtRow], dict[str, str]]:
    """The (provider, precision) rows a machine with these CPU flags, OpenVINO (installed or not) and ONNX
    Runtime providers runs, in TSRT_ROWS order, and why each other row is left out (keyed by "provider
    precision", or by the provider alone when none of its rows can run). Decided as tsrt decides what it
    refuses: bf16 only with native bf16 (emulated it was 2x slower than fp32), fp16 on CUDA only from an
    fp16 graph (the benchmark's graphs are fp32)."""
    from tsrt.engines.providers import BF16_CPU_FLAGS, PROVIDER_NAMES

    rows: list[TsrtRow] = []
    skipped: dict[str, str] = {}
    for provider, precision in TSRT_ROWS:
        if provider == "openvino" and not openvino:
            skipped["openvino"] = "OpenVINO is not installed (pip install 'tsrt[openvino]')"
        elif provider in ("cuda", "tensorrt") and PROVIDER_NAMES[provider] not in ort_providers:
            skipped[provider] = (f"no {PROVIDER_NAMES[provider]} in this onnxruntime build "
                                 f"({', '.join(ort_providers)}): GPU rows need onnxruntime-gpu and a GPU")
        elif precision == "bf16" and not set(flags) & set(BF16_CPU_FLAGS):
            skipped[f"{provider} {precision}"] = (
                f"this CPU has no native bf16 (no {' or '.join(BF16_CPU_FLAGS)} flag): OpenVINO would emulate it, "
                "slower than fp32, and tsrt refuses that")
        elif (provider, precision) == ("cuda", "fp16"):
            skipped[f"{provider} {precision}"] = (
                "CUDA runs fp16 only from a graph exported in fp16 (tsrt export --verify-with-torch --fp16); the "
                "benchmark's graphs are fp32 (the tensorrt fp16 row is the GPU's fp16)")
        else:
            rows.append((provider, precision))
    return rows, skipped


def tsrt_rows(providers: Collection[str] | None = None,
              precisions: Collection[str] | None = None) -> tuple[list[TsrtRow], dict[str, str]]:
    """This machine's rows (select_tsrt_rows), keeping only the providers and precisions asked for."""
    from tsrt.engines.providers import available_providers

    try:
        import openvino  # noqa: F401

        has_openvino = True
    except ModuleNotFoundError:
        has_openvino = False
    rows, skipped = select_tsrt_rows(cpu_flags(), has_openvino, available_providers())
    kept = [(p, q) for p, q in rows if (providers is None or p in providers) and (precisions is None or q in precisions)]
    return kept, skipped


def backends_for(workload: Workload, rows: Sequence[TsrtRow], with_nnunet: bool,
                 low_memory: bool = True) -> list[Backend]:
    """The rows of one workload: official first, then tsrt per (provider, precision) and, with `low_memory`,
    cpu fp32 with --low-memory; nnU-Net's pair where it can run."""
    backends = [Backend("totalseg", "official")] + [Backend("totalseg", "tsrt", p, q) for p, q in rows]
    if low_memory and ("cpu", "fp32") in rows:
        backends.append(Backend("totalseg", "tsrt", "cpu", "fp32", low_memory=True))
    nifti = workload.input.endswith((".nii", ".nii.gz")) or workload.input == "phantom"
    if with_nnunet and workload.fast and nifti:  # nnUNetPredictor reads files, one model: --fast's
        backends += [Backend("nnunet", "nnunet"), Backend("nnunet", "tsrt-model", "cpu")]
    return backends


def int8_form(rows: Sequence[TsrtRow]) -> str:
    """The int8 graphs' form: TensorRT's symmetric one when a tensorrt int8 row runs (ONNX Runtime and OpenVINO
    run it too; one int8 graph per model), else the CPU form (`tsrt models quantize` without --tensorrt)."""
    return "tensorrt" if ("tensorrt", "int8") in rows else "cpu"


def int8_scans(work: Path) -> tuple[list[Path], Path]:
    """(calibration phantoms, held-out phantom for the gate) as NIfTI files, written once into the work folder."""
    import nibabel as nib
    import numpy as np

    from tsrt.demo.phantom import make_phantom

    folder = work / "inputs" / "int8"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in [*CALIBRATION_PHANTOMS, VALIDATION_PHANTOM]:
        path = folder / f"phantom_{spec['seed']}_{'x'.join(map(str, spec['shape']))}.nii.gz"
        if not path.exists():
            phantom = make_phantom(**spec)
            partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))
            nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), partial)
            os.replace(partial, path)
        paths.append(path)
    return paths[:-1], paths[-1]


def has_int8(model_dir: Path, form: str) -> bool:
    """Whether the model folder holds a gated (or forced) int8 graph in `form` whose bytes its plan recorded."""
    from tsrt.errors import TsrtError
    from tsrt.models.plan import load_model_plans
    from tsrt.models.store import gated_int8_graphs

    try:
        plans = load_model_plans(model_dir)
        gated_int8_graphs(model_dir, plans)
    except TsrtError:  # none recorded, or not the bytes its plan recorded
        return False
    return all(((plan.int8 or {}).get("quantization") or {}).get("form", "cpu") == form for plan in plans)


def quantize_with_cli(target: list[str], model_dirs: list[Path], work: Path, homes: Homes, tiles: int, form: str,
                      name: str) -> dict[str, dict[str, Any]]:
    """`tsrt models quantize TARGET -c PHANTOMS --validation PHANTOM --force` in a child process (its ~10 GB go
    back with it), unless every model folder already holds an int8 graph of `form`; then each model's gate
    numbers from its quantization_report.json, with the child's time and peak memory when it ran."""
    ran: dict[str, Any] = {}
    if not all(has_int8(folder, form) for folder in model_dirs):
        calibration, validation = int8_scans(work)
        command = [sys.executable, "-c", "from tsrt.cli.root import main; main()", "models", "quantize", *target,
                   *[arg for scan in calibration for arg in ("-c", str(scan))], "--validation", str(validation),
                   "--force", "--tiles", str(tiles), *(["--tensorrt"] if form == "tensorrt" else [])]
        log = work / "logs" / f"quantize-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[set-up] int8 graphs for {name}: tsrt models quantize {' '.join(target)} --force ({tiles} calibration "
              "tiles; cached for later runs)", flush=True)
        started = time.perf_counter()
        with open(log, "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_env(homes), cwd=work)
            memory = TreeMemory(process.pid)
            process.wait()
            memory.stop()
        if process.returncode != 0:
            raise SystemExit(f"quantizing {name} failed (exit {process.returncode}); see {log}:\n"
                             + log.read_text()[-2000:])
        ran = {"quantize_s": round(time.perf_counter() - started, 1), "quantize_peak_mb": round(memory.peak_mb)}
    found = {}
    for folder in model_dirs:
        report = json.loads((folder / "quantization_report.json").read_text())
        found[report["model"]] = {
            "passed": report["passed"], "forced": report["forced"], "mean_dice": report["mean_dice"],
            "min_dice": report["min_dice"], "agreement": report["agreement"],
            "form": report["quantization"].get("form", "cpu"), "method": report["calibration"]["method"],
            "tiles": report["calibration"]["tiles"], "validation_scans": len(report["validation"]["scans"]), **ran,
        }
    return found


def install_int8(work: Path, weights: str, homes: Homes, tasks: set[str], form: str,
                 small: bool = False) -> dict[str, dict[str, Any]]:
    """Gated int8 graphs (forced past the gate) for every model the tasks run, in the store of `homes`;
    models already quantized in `form` are reused. Returns each model's gate numbers."""
    from tsrt.models.registry import get_task
    from tsrt.quantization.install import DEFAULT_MAX_TILES

    tiles = RANDOM_WEIGHTS_TILES if weights == "random" else DEFAULT_MAX_TILES
    found = {}
    for task_key in sorted(tasks):
        fast = task_key.endswith("_fast")
        task = get_task("total", fast=fast)
        folders = [homes[1] / "models" / model.name for model in task.required_models]
        name = f"{weights}{'-small' if small else ''}-{task_key}"
        found.update(quantize_with_cli(["total", *(["--fast"] if fast else [])], folders, work, homes, tiles, form, name))
    return found


def demo_model_copy(work: Path, form: str, with_int8: bool) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The bundled demo model copied into the work folder (quantizing writes into the model folder; the package's
    own stays untouched), keyed by its graph's sha256, with a forced int8 graph when asked: (folder, gate numbers)."""
    import shutil

    from tsrt.demo.run import demo_model_dir
    from tsrt.models.plan import load_model_plans
    from tsrt.quantization.install import DEFAULT_MAX_TILES

    source = demo_model_dir()
    sha = load_model_plans(source)[0].graph_sha256
    folder = work / "demo" / sha[:16]
    if not folder.exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        leave_out = shutil.ignore_patterns("*.int8.onnx", "quantization_report.json", "engines")
        shutil.copytree(source, partial, ignore=leave_out)
        os.replace(partial, folder)
    if not with_int8:
        return folder, {}
    homes = (work, work / "demo_tsrt_home")
    return folder, quantize_with_cli([str(folder)], [folder], work, homes, DEFAULT_MAX_TILES, form, "demo")


def job_for(backend: Backend, workload: Workload, image: Path, homes: Homes, output: Path) -> dict[str, Any]:
    """The JSON job backend_child.py runs: which backend, on what, with which model folder."""
    from tsrt.models.registry import get_task

    ts_home, tsrt_home = homes
    fast_model = get_task("total", fast=True).parts[0]
    job = {"backend": backend.backend, "input": str(image), "output": str(output), "task": workload.task,
           "fast": workload.fast, "provider": backend.provider, "precision": backend.precision,
           "low_memory": backend.low_memory,
           "step_size": fast_model.step_size}
    if backend.backend == "nnunet":
        from tsrt_export.import_totalseg import locate, results_root

        job["model_dir"] = str(locate(fast_model, results_root(ts_home)))
    if backend.backend == "tsrt-model":
        job["model_dir"] = str(tsrt_home / "models" / fast_model.name)
    return job


def child_env(homes: Homes) -> dict[str, str]:
    """The environment of a child run: these homes only (no user weights, no nnU-Net paths), the repo importable."""
    ts_home, tsrt_home = homes
    env = {k: v for k, v in os.environ.items() if k != "TOTALSEG_WEIGHTS_PATH" and not k.startswith("nnUNet_")}
    env.update(TOTALSEG_HOME_DIR=str(ts_home), TSRT_HOME=str(tsrt_home), PYTHONUTF8="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def output_path(work: Path, workload: Workload, backend: Backend, tag: str) -> Path:
    """Where a backend's labels for a workload go; `tag` keeps the random, confident and cold runs apart."""
    name = f"{workload.name}-{backend.tag}-{tag}"
    return work / "outputs" / (name + ".nii.gz")


def add_setup_arguments(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    """--weights, --small and --work: the set-up options of every script that runs backends alone."""
    if weights:
        parser.add_argument("--weights", choices=("random", "confident"), default="random",
                            help="seeded random weights or the trained demo backbone (default %(default)s)")
    parser.add_argument("--small", action="store_true", help="tiny 4-stage nets on 48^3 patches (smoke tests)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="the set-up cache (default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: {' '.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--prepare", action="store_true", help="build the weights, exports, int8 graphs and inputs now")
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    if unknown := set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    workloads = [WORKLOADS[name] for name in args.workloads or DEFAULT_WORKLOADS]
    rows, skipped = tsrt_rows()
    for workload in workloads:
        backends = backends_for(workload, rows, with_nnunet=True)
        print(f"{workload.name:13s} {workload.input:22s} {'--fast' if workload.fast else workload.task:7s} "
              f"runs<={workload.max_runs or '-'}  " + ", ".join(backend.label for backend in backends))
    for key, reason in skipped.items():
        print(f"not run: {key}: {reason}")
    if args.prepare:
        tasks = tasks_for(workloads, with_nnunet=True)
        homes = store_models(args.work, args.weights, tasks, small=args.small)
        if any(precision == "int8" for _, precision in rows):
            install_int8(args.work, args.weights, homes, {t for w in workloads for t in w.ts_tasks}, int8_form(rows),
                         small=args.small)
        for workload in workloads:
            print(f"{workload.name}: {prepare_input(args.work, workload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
