"""What the benchmarks run: workloads, backends, and their cached set-up (weights, exports, inputs).

    python benchmarks/workloads.py                          # list the workloads and the backends each runs
    python benchmarks/workloads.py --prepare ct_fast        # build its weights, exports and input in the cache

Shared by speed.py, accuracy.py, cold_start.py and backends.py, so every script measures the same
inputs on the same weights. Weights are TotalSegmentator-sized networks (6 stages, 32..320 features,
128^3 patches, the real class counts) with seeded random weights in TotalSegmentator's layout
(tsrt_export.fixtures), or "confident" ones (the trained demo model's backbone), imported into a tsrt
store with the same export `tsrt models import` runs. Set-up is slow (minutes per task), so it is
cached in the work folder and reused by later runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
CPU_PROVIDERS = ("cpu", "openvino", "openvino-bf16")


@dataclass(frozen=True)
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


def tsrt_providers(requested: list[str] | None) -> list[str]:
    """Every provider present: cpu, openvino (+bf16) when installed, cuda/tensorrt with a GPU build."""
    from tsrt.engines.providers import PROVIDER_NAMES, available_providers

    present = ["cpu"]
    try:
        import openvino  # noqa: F401

        present += ["openvino", *(["openvino-bf16"] if native_bf16() else [])]  # tsrt refuses emulated bf16
    except ModuleNotFoundError:
        pass
    available = available_providers()
    present += [name for name in ("cuda", "tensorrt") if PROVIDER_NAMES[name] in available]
    return [p for p in present if requested is None or p in requested]


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (tsrt refuses --precision bf16 elsewhere)."""
    from tsrt.engines.providers import native_bf16 as cpu_has_native_bf16

    return cpu_has_native_bf16()


def backends_for(workload: Workload, providers: list[str], with_nnunet: bool) -> list[Backend]:
    """The rows of one workload: official first, then tsrt per provider; nnU-Net's pair where it can run."""
    if workload.name != "ct_fast" and not native_bf16():  # emulated bf16: one workload shows it, the rest skip it
        providers = [p for p in providers if p != "openvino-bf16"]
    rows = [Backend("totalseg", "official")] + [Backend("totalseg", "tsrt", p) for p in providers]
    nifti = workload.input.endswith((".nii", ".nii.gz")) or workload.input == "phantom"
    if with_nnunet and workload.fast and nifti:  # nnUNetPredictor reads files, one model: --fast's
        rows += [Backend("nnunet", "nnunet"), Backend("nnunet", "tsrt-model", "cpu")]
    return rows


def job_for(backend: Backend, workload: Workload, image: Path, homes: Homes, output: Path) -> dict[str, Any]:
    """The JSON job backend_child.py runs: which backend, on what, with which model folder."""
    from tsrt.models.registry import get_task

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


def child_env(homes: Homes) -> dict[str, str]:
    """The environment of a child run: these homes only (no user weights, no nnU-Net paths), the repo importable."""
    ts_home, tsrt_home = homes
    env = {k: v for k, v in os.environ.items() if k != "TOTALSEG_WEIGHTS_PATH" and not k.startswith("nnUNet_")}
    env.update(TOTALSEG_HOME_DIR=str(ts_home), TSRT_HOME=str(tsrt_home), PYTHONUTF8="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def output_path(work: Path, workload: Workload, backend: Backend, tag: str) -> Path:
    """Where a backend's labels for a workload go; `tag` keeps the random, confident and cold runs apart."""
    name = f"{workload.name}-{backend.backend}-{backend.provider}-{tag}"
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
    parser.add_argument("--prepare", action="store_true", help="build the weights, exports and inputs now")
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    if unknown := set(args.workloads) - set(WORKLOADS):
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    workloads = [WORKLOADS[name] for name in args.workloads or DEFAULT_WORKLOADS]
    providers = tsrt_providers(None)
    for workload in workloads:
        rows = backends_for(workload, providers, with_nnunet=True)
        print(f"{workload.name:13s} {workload.input:22s} {'--fast' if workload.fast else workload.task:7s} "
              f"runs<={workload.max_runs or '-'}  " + ", ".join(row.label for row in rows))
    if args.prepare:
        store_models(args.work, args.weights, tasks_for(workloads, with_nnunet=True), small=args.small)
        for workload in workloads:
            print(f"{workload.name}: {prepare_input(args.work, workload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
