"""Backends side by side on the same inputs and weights: official TotalSegmentator, nnUNetPredictor, tsrt.

    python benchmarks/backends.py --quick          # < 10 min on 2 cores: --fast on example_ct
    python benchmarks/backends.py                  # the full run (README's Performance table)

Every run is a child process (benchmarks/backend_child.py), so wall time includes start-up and
peak RSS is that run's alone (the process tree's resident memory, sampled, and the child's VmHWM).
Backends alternate A B C A B C ... after a warm-up round; medians are reported.

Weights: TotalSegmentator-sized networks (6 stages, 32..320 features, 128^3 patches, the real class
counts) with seeded random weights in TotalSegmentator's layout (tsrt_export.fixtures), imported
into a tsrt store with the same export `tsrt models import` runs. Random weights put near-tied
logits everywhere, so float noise alone caps agreement between backends (~99.8 %); the accuracy
section therefore also runs "confident" weights (the trained demo model's backbone, its own
architecture at 128^3 patches), and the demo model itself for reduced precision vs fp32.

Groups: `totalseg` rows compare tsrt's task path (every provider present) with official
TotalSegmentator (ratio = official wall / backend wall); `nnunet` rows compare `tsrt segment
--model` with nnU-Net's nnUNetPredictor on the same single model (its --fast model).

On a CPU without native bf16, OpenVINO emulates it (several times slower than fp32), so
openvino-bf16 then runs only on ct_fast and the demo model.

Outputs (--out, default benchmarks/results): NAME.json (everything), NAME.md (tables), NAME.png.
Set-up (fixture weights, exports, phantom) is cached in --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "backend_child.py"
SHARED = REPO.parent / "shared" / "data"
STAGES = ("startup", "load models", "read", "preprocess", "inference", "postprocess", "write")
#: Voxel agreement that float noise alone leaves between two backends on random TotalSegmentator-sized nets.
RANDOM_WEIGHTS_FLOOR = 0.998


@dataclass(frozen=True)
class Workload:
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


# --------------------------------------------------------------------------------------------- set-up


def store_models(work: Path, weights: str, tasks: set[str], small: bool = False) -> tuple[Path, Path]:
    """(TotalSegmentator home, tsrt home) holding `tasks` with `weights` (random | confident), cached in work.

    `small`: 4-stage nets on 48^3 patches instead of TotalSegmentator-sized ones (smoke tests only).
    """
    from tsrt.registry import get_task
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


def prepare_input(work: Path, workload: Workload) -> Path:
    if workload.input != "phantom":
        path = SHARED / workload.input
        if not path.exists():
            raise SystemExit(f"{path} is missing: the benchmark needs ../shared/data")
        return path
    path = work / "inputs" / "phantom_512x512x800_0.8mm.nii.gz"
    if not path.exists():
        import nibabel as nib

        from tsrt.phantom import make_phantom

        print("[set-up] large phantom 512x512x800 at 0.8 mm", flush=True)
        phantom = make_phantom(**PHANTOM)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))  # nibabel needs .nii.gz last
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), partial)
        os.replace(partial, path)
    return path


def tsrt_providers(requested: list[str] | None) -> list[str]:
    """Every provider present: cpu, openvino (+bf16) when installed, cuda/tensorrt with a GPU build."""
    from tsrt.providers import PROVIDER_NAMES, available_providers

    present = ["cpu"]
    try:
        import openvino  # noqa: F401

        present += ["openvino", "openvino-bf16"]
    except ModuleNotFoundError:
        pass
    available = available_providers()
    present += [name for name in ("cuda", "tensorrt") if PROVIDER_NAMES[name] in available]
    return [p for p in present if requested is None or p in requested]


# --------------------------------------------------------------------------------------------- runs


class TreeMemory:
    """Peak memory of a process and its descendants (PSS, sampled every 250 ms) and of the GPU (nvidia-smi).

    Reading smaps_rollup of a multi-GB process and walking every thread's children is not free: at
    50 ms the sampler took ~40 % of one core (measured on the 2-core machine), time the backends lost.
    Each child's own VmHWM is exact anyway; the sampling adds its worker processes.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self.gpu_peak_mb: float | None = None
        self._gpu_baseline = _gpu_used_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in _descendants(self.pid)))
            if self._gpu_baseline is not None and ticks % 10 == 0:
                used = _gpu_used_mb()
                if used is not None:
                    self.gpu_peak_mb = max(self.gpu_peak_mb or 0.0, used - self._gpu_baseline)
            ticks += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (torch's libraries in every nnU-Net worker) counted once overall."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def _gpu_used_mb() -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_child(job: dict, work: Path, env: dict[str, str]) -> dict:
    """One segmentation in a fresh process; wall time from spawn to exit."""
    job_file = work / "jobs" / f"{job['label']}.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(job))
    output = Path(job["output"])
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{job['label']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(CHILD), str(job_file)], stdout=subprocess.PIPE,
                                   stderr=stderr, env=env, text=True, cwd=work)
        memory = TreeMemory(process.pid)
        stdout, _ = process.communicate()
        memory.stop()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{job['label']} failed (exit {process.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    stages = result["stages"]
    stages["startup"] = stages.get("startup", 0.0) + max(0.0, wall - result["in_process_s"])
    return {**result, "wall_s": wall, "peak_rss_mb": max(memory.peak_mb, result["vmhwm_mb"]),
            "gpu_peak_mb": memory.gpu_peak_mb}


@dataclass
class Backend:
    """One row: a backend (official, nnunet, tsrt, tsrt-model) with its provider, in a comparison group."""

    group: str  # totalseg | nnunet
    backend: str
    provider: str = "cpu"

    @property
    def label(self) -> str:
        if self.backend == "official":
            return "TotalSegmentator (PyTorch)"
        if self.backend == "nnunet":
            return "nnUNetPredictor (PyTorch)"
        return f"tsrt {self.provider}" + (" --model" if self.backend == "tsrt-model" else "")

    @property
    def reference(self) -> bool:
        return self.backend in ("official", "nnunet")


def native_bf16() -> bool:
    """Whether OpenVINO computes bf16 natively here (else it emulates it, several times slower than fp32)."""
    try:
        import openvino
    except ModuleNotFoundError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def backends_for(workload: Workload, providers: list[str], with_nnunet: bool) -> list[Backend]:
    if workload.name != "ct_fast" and not native_bf16():  # emulated bf16: one workload shows it, the rest skip it
        providers = [p for p in providers if p != "openvino-bf16"]
    rows = [Backend("totalseg", "official")] + [Backend("totalseg", "tsrt", p) for p in providers]
    nifti = workload.input.endswith((".nii", ".nii.gz")) or workload.input == "phantom"
    if with_nnunet and workload.fast and nifti:  # nnUNetPredictor reads files, one model: --fast's
        rows += [Backend("nnunet", "nnunet"), Backend("nnunet", "tsrt-model", "cpu")]
    return rows


def job_for(backend: Backend, workload: Workload, image: Path, homes: tuple[Path, Path], output: Path) -> dict:
    from tsrt.registry import get_task

    ts_home, tsrt_home = homes
    fast_model = get_task("total", fast=True).parts[0]
    job = {"backend": backend.backend, "input": str(image), "output": str(output), "task": workload.task,
           "fast": workload.fast, "provider": backend.provider, "step_size": fast_model.step_size}
    if backend.backend == "nnunet":
        from tsrt_export.import_totalseg import locate, results_root

        job["model_dir"] = str(locate(fast_model, results_root(ts_home)))
    if backend.backend == "tsrt-model":
        job["model_dir"] = str(tsrt_home / "models" / fast_model.name)
    return job


def child_env(homes: tuple[Path, Path]) -> dict[str, str]:
    ts_home, tsrt_home = homes
    env = {k: v for k, v in os.environ.items() if k != "TOTALSEG_WEIGHTS_PATH" and not k.startswith("nnUNet_")}
    env.update(TOTALSEG_HOME_DIR=str(ts_home), TSRT_HOME=str(tsrt_home), PYTHONUTF8="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def output_path(work: Path, workload: Workload, backend: Backend, tag: str) -> Path:
    name = f"{workload.name}-{backend.backend}-{backend.provider}-{tag}"
    return work / "outputs" / (name + ".nii.gz")


def measure_workload(workload: Workload, rows: list[Backend], image: Path, homes: tuple[Path, Path], work: Path,
                     runs: int, warmup: int, failures: dict[str, str]) -> dict:
    """Alternate the backends round by round; the first `warmup` rounds are not counted.

    A backend whose run fails is reported in `failures` and left out of later rounds; the others go on.
    """
    env = child_env(homes)
    measured: dict[str, list[dict]] = {row.label: [] for row in rows}
    for round_index in range(warmup + runs):
        for row in rows:
            key = f"{workload.name}: {row.label}"
            if key in failures:
                continue
            job = job_for(row, workload, image, homes, output_path(work, workload, row, "last"))
            job["label"] = f"{workload.name}-{row.backend}-{row.provider}-r{round_index}"
            try:
                result = run_child(job, work, env)
            except RuntimeError as err:
                failures[key] = str(err).splitlines()[0]
                print(f"  {workload.name:13s} {row.label:28s} FAILED: {failures[key]}", flush=True)
                continue
            kind = "warm-up" if round_index < warmup else "run"
            print(f"  {workload.name:13s} {row.label:28s} {kind:7s} {result['wall_s']:7.1f}s "
                  f"peak {result['peak_rss_mb']:6.0f} MB", flush=True)
            if round_index >= warmup:
                measured[row.label].append(result)
    return {row.label: summarise(row, measured[row.label]) for row in rows if measured[row.label]}


def summarise(row: Backend, results: list[dict]) -> dict:
    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    stages = {stage: median([r["stages"].get(stage, 0.0) for r in results]) for stage in STAGES}
    wall = median([r["wall_s"] for r in results])
    inference = stages["inference"]
    network = median([r.get("network_s") for r in results])
    tiles = results[-1]["tiles"]
    return {
        "group": row.group, "backend": row.backend, "provider": row.provider, "runs": len(results),
        "wall_s": wall, "wall_all_s": [r["wall_s"] for r in results], "stages_s": stages,
        "network_s": network, "tiles": tiles, "tiles_per_s": tiles / inference if inference else None,
        "peak_rss_mb": median([r["peak_rss_mb"] for r in results]),
        "gpu_peak_mb": median([r.get("gpu_peak_mb") for r in results]),
        # The share of wall time not spent in the network (session.run); tsrt rows only.
        "non_inference_share": (1.0 - network / wall) if network is not None and wall else None,
    }


# --------------------------------------------------------------------------------------------- accuracy


def agreement_and_dice(expected_path: Path, actual_path: Path) -> dict:
    """Voxel agreement and mean Dice over classes present in either label map."""
    import nibabel as nib
    import numpy as np

    expected = np.asanyarray(nib.load(expected_path).dataobj)
    actual = np.asanyarray(nib.load(actual_path).dataobj)
    if expected.shape != actual.shape:
        return {"agreement": None, "dice": None, "note": f"shapes differ {expected.shape} vs {actual.shape}"}
    labels = np.union1d(np.unique(expected), np.unique(actual))
    labels = labels[labels != 0]
    counts_e = np.bincount(expected.ravel(), minlength=int(labels.max(initial=0)) + 1)
    counts_a = np.bincount(actual.ravel(), minlength=int(labels.max(initial=0)) + 1)
    both = np.bincount(expected[expected == actual].ravel(), minlength=len(counts_e))
    dice = [2.0 * both[label] / (counts_e[label] + counts_a[label]) for label in labels]
    return {"agreement": float(np.mean(expected == actual)), "dice": float(np.mean(dice)) if dice else 1.0,
            "classes": int(len(labels))}


def compare_outputs(workload: Workload, rows: list[Backend], work: Path) -> dict:
    accuracy = {}
    for group in ("totalseg", "nnunet"):
        reference = next((row for row in rows if row.group == group and row.reference), None)
        if reference is None:
            continue
        expected = output_path(work, workload, reference, "last")
        for row in rows:
            if row.group == group and not row.reference:
                accuracy[row.label] = agreement_and_dice(expected, output_path(work, workload, row, "last"))
    return accuracy


def confident_accuracy(workloads: list[Workload], providers: list[str], work: Path, small: bool = False) -> dict:
    """Every backend once on confident weights: Dice vs official TotalSegmentator without the random-weights floor."""
    homes = store_models(work, "confident", {t for w in workloads for t in w.ts_tasks}, small)
    env = child_env(homes)
    found = {}
    for workload in workloads:
        image = prepare_input(work, workload)
        rows = backends_for(workload, providers, with_nnunet=False)
        done = []
        for row in rows:
            job = job_for(row, workload, image, homes, output_path(work, workload, row, "confident"))
            job["label"] = f"confident-{workload.name}-{row.backend}-{row.provider}"
            try:
                run_child(job, work, env)
                done.append(row)
            except RuntimeError as err:
                print(f"  confident {workload.name} {row.label} FAILED: {str(err).splitlines()[0]}", flush=True)
        if not done or done[0].backend != "official":
            continue
        reference = output_path(work, workload, rows[0], "confident")
        found[workload.name] = {
            row.label: agreement_and_dice(reference, output_path(work, workload, row, "confident")) for row in done[1:]
        }
        print(f"  confident {workload.name}: " + ", ".join(
            f"{k} Dice {v['dice']:.4f}" for k, v in found[workload.name].items()), flush=True)
    return found


def demo_precision(providers: list[str], work: Path, runs: int, warmup: int) -> dict:
    """The trained demo model on its phantom: speed and Dice of each CPU provider vs fp32 ONNX Runtime and truth."""
    import nibabel as nib
    import numpy as np

    from tsrt.demo import demo_model_dir, dice
    from tsrt.phantom import PHANTOM_LABELS, make_phantom

    phantom = make_phantom(**DEMO_PHANTOM)
    image = work / "inputs" / "demo_phantom.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), image)
    env = child_env((work, work / "demo_tsrt_home"))
    cpu_providers = [p for p in providers if p in ("cpu", "openvino", "openvino-bf16")]
    walls: dict[str, list[float]] = {p: [] for p in cpu_providers}
    outputs = {p: work / "outputs" / f"demo-{p}.nii.gz" for p in cpu_providers}
    for round_index in range(warmup + runs):
        for provider in cpu_providers:
            job = {"backend": "tsrt-model", "input": str(image), "output": str(outputs[provider]),
                   "model_dir": str(demo_model_dir()), "provider": provider, "step_size": 0.5,
                   "label": f"demo-{provider}-r{round_index}"}
            result = run_child(job, work, env)
            if round_index >= warmup:
                walls[provider].append(result["stages"]["inference"])
    labels = {p: np.asanyarray(nib.load(path).dataobj) for p, path in outputs.items()}
    found = {}
    for provider in cpu_providers:
        present = [v for v in PHANTOM_LABELS if (labels["cpu"] == v).any() or (labels[provider] == v).any()]
        found[provider] = {
            "inference_s": statistics.median(walls[provider]),
            "speedup_vs_cpu": statistics.median(walls["cpu"]) / statistics.median(walls[provider]),
            "dice_vs_fp32": float(np.mean([dice(labels["cpu"] == v, labels[provider] == v) for v in present])),
            "dice_vs_truth": float(np.mean([dice(phantom.labels == v, labels[provider] == v) for v in PHANTOM_LABELS
                                            if (phantom.labels == v).any()])),
        }
    return found


# --------------------------------------------------------------------------------------------- extras


def cold_start(homes: tuple[Path, Path], work: Path, image: Path) -> dict:
    """`tsrt --help` and `TotalSegmentator --help` wall times, and tsrt's first --fast run with an empty cache."""
    found: dict = {}
    # the interpreter running the benchmark (the dev venv) and the runtime-only venv (torch-free install)
    venvs = {"dev": Path(sys.prefix), "runtime": Path(os.environ.get("TSRT_RUNTIME_VENV", REPO / ".venv-runtime"))}
    for name, venv in venvs.items():
        tsrt_bin = venv / "bin" / "tsrt"
        if tsrt_bin.exists():
            found[f"tsrt --help ({name} venv)"] = _median_wall([str(tsrt_bin), "--help"])
    ts_bin = Path(sys.prefix) / "bin" / "TotalSegmentator"
    if ts_bin.exists():
        found["TotalSegmentator --help"] = _median_wall([str(ts_bin), "--help"])
    cache = homes[1] / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = child_env(homes)
    workload = WORKLOADS["ct_fast"]
    row = Backend("totalseg", "tsrt", "cpu")
    job = job_for(row, workload, image, homes, output_path(work, workload, row, "cold"))
    job["label"] = "cold-start"
    first = run_child(job, work, env)
    job["label"] = "warm-start"
    second = run_child(job, work, env)
    found["tsrt --fast example_ct, empty cache (s)"] = first["wall_s"]
    found["tsrt --fast example_ct, warm cache (s)"] = second["wall_s"]
    return found


def _median_wall(command: list[str], repeats: int = 3) -> float:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def installed_sizes() -> dict:
    """Installed bytes of each distribution closure, read from the dev venv's RECORD files, and of .venv-runtime."""
    import re
    from importlib import metadata

    def closure(root: str) -> set[str]:
        seen: set[str] = set()
        queue = [root]
        while queue:
            name = re.split(r"[ ;<>=!\[~(]", queue.pop(), maxsplit=1)[0].lower().replace("_", "-")
            if name in seen:
                continue
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            seen.add(name)
            queue.extend(r for r in (dist.requires or []) if "extra ==" not in r)
        return seen

    def size(names: set[str]) -> int:
        total = 0
        for name in names:
            for file in metadata.distribution(name).files or []:
                try:
                    total += file.locate().stat().st_size
                except OSError:
                    pass
        return total

    found = {
        "TotalSegmentator 2.18 + dependencies (dev venv, RECORD sizes)": size(closure("totalsegmentator")) / 2**20,
        "tsrt runtime dependencies (dev venv, RECORD sizes)": size(closure("tsrt") - {"tsrt"}) / 2**20,
    }
    runtime = Path(os.environ.get("TSRT_RUNTIME_VENV", REPO / ".venv-runtime"))
    if runtime.is_dir():
        found[".venv-runtime on disk (du, whole venv)"] = _du_mb(runtime)
    found[".venv on disk (du, the dev venv: TotalSegmentator, torch, tsrt dev tools)"] = _du_mb(Path(sys.prefix))
    return {key: round(value) for key, value in found.items()}


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True).stdout
    return float(out.split()[0]) if out else float("nan")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    import onnxruntime

    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") *
            os.sysconf("SC_PAGE_SIZE") / 2**30), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "load_average_at_start": os.getloadavg(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags}
    try:
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
    except ModuleNotFoundError:
        pass
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# --------------------------------------------------------------------------------------------- report


def targets(report: dict) -> list[dict]:
    """The issue's CPU targets for tsrt (fp32, ONNX Runtime cpu) against official TotalSegmentator."""
    found = []
    rows = report["workloads"]

    def pair(workload: str) -> tuple[dict, dict] | None:
        if workload not in rows or "tsrt cpu" not in rows[workload] or "TotalSegmentator (PyTorch)" not in rows[workload]:
            return None
        return rows[workload]["TotalSegmentator (PyTorch)"], rows[workload]["tsrt cpu"]

    if (fast := pair("ct_fast")) is not None:
        speedup = fast[0]["wall_s"] / fast[1]["wall_s"]
        found.append({"target": "--fast on example_ct >= 5x faster", "measured": f"{speedup:.2f}x",
                      "reached": speedup >= 5})
        found.append({"target": "--fast on example_ct <= 1 GB peak RSS",
                      "measured": f"{fast[1]['peak_rss_mb']:.0f} MB", "reached": fast[1]["peak_rss_mb"] <= 1024})
    if (total := pair("ct_total")) is not None:
        speedup = total[0]["wall_s"] / total[1]["wall_s"]
        found.append({"target": "total on example_ct >= 2.3x faster (fp32)", "measured": f"{speedup:.2f}x",
                      "reached": speedup >= 2.3})
    shares = {name: workload["tsrt cpu"]["non_inference_share"] for name, workload in rows.items()
              if "tsrt cpu" in workload and workload["tsrt cpu"].get("non_inference_share") is not None}
    if shares:
        worst = max(shares, key=shares.get)
        found.append({"target": "non-inference overhead <= 10 % of tsrt's wall time",
                      "measured": ", ".join(f"{k} {v * 100:.0f} %" for k, v in shares.items()),
                      "reached": shares[worst] <= 0.10})
    if "phantom_fast" in rows and "tsrt cpu" in rows["phantom_fast"]:
        peak = rows["phantom_fast"]["tsrt cpu"]["peak_rss_mb"]
        found.append({"target": "512x512x800 phantom --fast < 2 GB peak RSS", "measured": f"{peak:.0f} MB",
                      "reached": peak < 2048})
    return found


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB; load average at start "
             f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])}; "
             f"{report['runs']} timed run(s) after {report['warmup']} warm-up round(s), medians"
             + "".join(f"; {name}: {n} run, no warm-up" for name, n in report.get("runs_capped", {}).items())
             + ".", "",
             f"Command: `{report['command']}`"
             + (f" (resuming the run of {report['resumed_from']})" if report.get("resumed_from") else ""), ""]
    header = ("| workload | backend | wall s | × vs reference | load models | read | preprocess | inference | postprocess "
              "| write | startup | tiles/s | peak RSS MB | outside network | agreement | Dice |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, rows in report["workloads"].items():
        accuracy = report["accuracy_random_weights"].get(name, {})
        references = {row["group"]: row["wall_s"] for row in rows.values() if row["backend"] in ("official", "nnunet")}
        for label, row in rows.items():
            reference = references.get(row["group"])
            ratio = f"{reference / row['wall_s']:.2f}×" if reference and row["wall_s"] else "–"
            stages = row["stages_s"]
            acc = accuracy.get(label, {})
            gpu = f" (GPU {row['gpu_peak_mb']:.0f})" if row.get("gpu_peak_mb") else ""
            cells = [name, label, f"{row['wall_s']:.1f}", "ref" if label in
                     ("TotalSegmentator (PyTorch)", "nnUNetPredictor (PyTorch)") else ratio]
            cells += [f"{stages[s]:.1f}" if stages.get(s) else "–" for s in
                      ("load models", "read", "preprocess", "inference", "postprocess", "write", "startup")]
            cells += [f"{row['tiles_per_s']:.2f}" if row.get("tiles_per_s") else "–",
                      f"{row['peak_rss_mb']:.0f}{gpu}",
                      f"{row['non_inference_share'] * 100:.0f} %" if row.get("non_inference_share") is not None else "–",
                      f"{acc['agreement'] * 100:.2f} %" if acc.get("agreement") is not None else "–",
                      f"{acc['dice']:.4f}" if acc.get("dice") is not None else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Random weights: float noise alone caps agreement at about {RANDOM_WEIGHTS_FLOOR * 100:.1f} % "
              "(near-tied logits); the confident-weights table below is the accuracy check.",
              "Official TotalSegmentator's `preprocess` includes nnU-Net's own pipeline around the network "
              "(worker start-up, preprocessing, export in worker processes); `startup` is process start and imports.",
              ""]
    if report.get("failures"):
        lines += ["Failed runs (left out above):", ""] + [f"- {k}: {v}" for k, v in report["failures"].items()] + [""]
    if report.get("targets"):
        lines += ["| target (tsrt cpu, fp32) | measured | reached |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in report["targets"]]
        lines.append("")
    if report.get("accuracy_confident"):
        lines += ["Confident weights (trained demo backbone, 128³ patches), Dice vs official TotalSegmentator:", "",
                  "| workload | backend | agreement | mean Dice | classes |", "|---|---|---|---|---|"]
        for name, rows in report["accuracy_confident"].items():
            for label, acc in rows.items():
                lines.append(f"| {name} | {label} | {acc['agreement'] * 100:.3f} % | {acc['dice']:.4f} | "
                             f"{acc.get('classes', '–')} |")
        lines.append("")
    if report.get("demo_precision"):
        lines += ["Trained demo model on an unseen phantom (reduced precision vs fp32 ONNX Runtime; "
                  "Dice = mean over the phantom's 8 organs, the demo model has learned only some of them):", "",
                  "| provider | inference s | speed-up vs cpu | Dice vs fp32 | Dice vs truth |", "|---|---|---|---|---|"]
        for provider, row in report["demo_precision"].items():
            lines.append(f"| {provider} | {row['inference_s']:.2f} | {row['speedup_vs_cpu']:.2f}× | "
                         f"{row['dice_vs_fp32']:.4f} | {row['dice_vs_truth']:.4f} |")
        lines.append("")
    if report.get("cold_start"):
        lines += ["| cold start | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["cold_start"].items()] + [""]
    if report.get("installed_mb"):
        lines += ["| installed size | MB |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["installed_mb"].items()] + [""]
    return "\n".join(lines)


def plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = {name: rows for name, rows in report["workloads"].items() if rows}
    if not workloads:
        return
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 1.0 + 0.55 * sum(len(r) for r in workloads.values())
                                                         + 0.6 * len(workloads)), squeeze=False)
    colours = dict(zip(STAGES, ("#bbbbbb", "#8c564b", "#9467bd", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")))
    for ax, (name, rows) in zip(axes[:, 0], workloads.items()):
        labels = list(rows)
        left = [0.0] * len(labels)
        for stage in STAGES:
            widths = [rows[label]["stages_s"].get(stage) or 0.0 for label in labels]
            ax.barh(labels, widths, left=left, color=colours[stage], label=stage)
            left = [a + b for a, b in zip(left, widths)]
        for index, label in enumerate(labels):
            row = rows[label]
            ax.text(left[index], index, f" {row['wall_s']:.1f} s, {row['peak_rss_mb'] / 1024:.2f} GB", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_xlim(0, max(left) * 1.35)
    axes[-1, 0].set_xlabel("wall time per run (s), by stage; peak RSS at the bar's end")
    handles, names = axes[0, 0].get_legend_handles_labels()
    height = fig.get_size_inches()[1]
    fig.legend(handles, names, ncol=len(STAGES), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / height))
    fig.suptitle(f"tsrt vs PyTorch backends - {report['machine']['cpu']}, {report['machine']['cores']} cores",
                 fontsize=10, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    fig.savefig(target, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="ct_fast only, 1 timed run, no nnUNetPredictor/confident/cold-start extras (< 10 min)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS))
    parser.add_argument("--providers", nargs="+", help="tsrt providers to run (default: every one present)")
    parser.add_argument("--runs", type=int, help="timed runs per backend (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 1, quick 0)")
    parser.add_argument("--small", action="store_true",
                        help="tiny 4-stage nets on 48^3 patches instead of TotalSegmentator-sized ones (smoke tests)")
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnUNetPredictor comparison")
    parser.add_argument("--no-extras", action="store_true", help="skip confident weights, demo, cold start, sizes")
    parser.add_argument("--work", type=Path, help="cache for weights, exports and outputs (default ~/.cache/tsrt-bench)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", help="output file stem (default: quick or full)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the workloads (and cold start) already in OUT/NAME.json and measure only the rest")
    args = parser.parse_args(argv)

    quick = args.quick
    names = args.workloads or (["ct_fast"] if quick else list(DEFAULT_WORKLOADS))
    workloads = [WORKLOADS[name] for name in names]
    runs = args.runs or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    work = args.work or Path.home() / ".cache" / "tsrt-bench"
    work.mkdir(parents=True, exist_ok=True)
    providers = tsrt_providers(args.providers)
    stem = args.name or ("quick" if quick else "full")
    started = time.perf_counter()
    report: dict = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)
                                                         if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                                        *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "runs": runs, "warmup": warmup,
                    "providers": providers, "network": ("4 stages, 4..32 features, 48^3 patch" if args.small else
                                "6 stages, 32..320 features, 128^3 patch") + ", seeded random weights",
                    "random_weights_floor": RANDOM_WEIGHTS_FLOOR, "workloads": {}, "accuracy_random_weights": {},
                    "failures": {}}
    previous = args.out / f"{stem}.json"
    if args.resume and previous.exists():  # an interrupted run: keep what it measured
        kept = json.loads(previous.read_text())
        for key in ("workloads", "accuracy_random_weights", "failures", "runs_capped", "cold_start"):
            if key in kept:
                report[key] = kept[key]
        report["resumed_from"] = kept.get("date")
        print(f"resuming {previous}: {', '.join(kept['workloads'])} kept", flush=True)
    homes = store_models(work, "random", {t for w in workloads for t in w.ts_tasks}
                         | ({"total_fast"} if not args.no_nnunet else set()), small=args.small)
    if not (quick or args.no_extras or "cold_start" in report):
        report["cold_start"] = cold_start(homes, work, prepare_input(work, WORKLOADS["ct_fast"]))
    for workload in workloads:
        if workload.name in report["workloads"]:
            continue
        image = prepare_input(work, workload)
        rows = backends_for(workload, providers, with_nnunet=not (args.no_nnunet or quick))
        capped = workload.max_runs is not None and runs > workload.max_runs
        workload_runs, workload_warmup = (workload.max_runs, 0) if capped else (runs, warmup)
        measured = measure_workload(workload, rows, image, homes, work, workload_runs, workload_warmup,
                                    report["failures"])
        report["workloads"][workload.name] = measured
        if capped:
            report.setdefault("runs_capped", {})[workload.name] = workload_runs
        ran = [row for row in rows if row.label in measured]
        report["accuracy_random_weights"][workload.name] = compare_outputs(workload, ran, work)
        save(report, args.out, stem, started)  # partial results survive an interrupted run
    if not (quick or args.no_extras):
        accuracy_workloads = [w for w in workloads if w.input.endswith(".nii.gz")]  # the shared CTs, not the phantom
        report["accuracy_confident"] = confident_accuracy(accuracy_workloads, providers, work, args.small)
        report["demo_precision"] = demo_precision(providers, work, runs, warmup)
        report["installed_mb"] = installed_sizes()
    elif quick:
        report["demo_precision"] = demo_precision(providers, work, runs, warmup)
    save(report, args.out, stem, started)
    print(markdown(report))
    print(f"wrote {args.out / stem}.json/.md/.png in {report['seconds'] / 60:.1f} min")
    return 0


def save(report: dict, out: Path, stem: str, started: float) -> None:
    """Write (or rewrite) the JSON, Markdown and PNG files with what has been measured so far."""
    report["targets"] = targets(report)
    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    plot(report, out / f"{stem}.png")


if __name__ == "__main__":
    raise SystemExit(main())
