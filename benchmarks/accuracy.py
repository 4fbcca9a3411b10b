"""Voxel agreement and mean Dice between two label maps, and the benchmark's accuracy checks built on them.

    python benchmarks/accuracy.py official.nii.gz tsrt.nii.gz       # one JSON line: agreement, Dice, classes

Random weights put near-tied logits everywhere, so float noise alone caps agreement between backends
at about RANDOM_WEIGHTS_FLOOR: that comparison (compare_outputs) shows the backends run the same
pipeline, not that they agree to the voxel. Hence two more checks: every backend on "confident"
weights (the trained demo model's backbone in TotalSegmentator's layout), and the demo model itself
on an unseen phantom for reduced precision (OpenVINO fp32/bf16) against fp32 ONNX Runtime and truth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from speed import run_backend, run_child
from workloads import (
    CPU_PROVIDERS, DEMO_PHANTOM, Backend, Workload, backends_for, child_env, output_path, prepare_input, store_models,
    tasks_for,
)

#: Voxel agreement that float noise alone leaves between two backends on random TotalSegmentator-sized nets.
RANDOM_WEIGHTS_FLOOR = 0.998


def agreement_and_dice(expected_path: Path, actual_path: Path) -> dict[str, Any]:
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


def compare_outputs(workload: Workload, rows: list[Backend], work: Path) -> dict[str, dict[str, Any]]:
    """Each row's last labels against its group's reference (official TotalSegmentator, nnUNetPredictor)."""
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


def confident_accuracy(workloads: list[Workload], providers: list[str], work: Path,
                       small: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """Every backend once on confident weights: Dice vs official TotalSegmentator without the random-weights floor."""
    homes = store_models(work, "confident", tasks_for(workloads, with_nnunet=False), small)
    found = {}
    for workload in workloads:
        image = prepare_input(work, workload)
        rows = backends_for(workload, providers, with_nnunet=False)
        done = []
        for row in rows:
            try:
                run_backend(row, workload, image, homes, work, "confident",
                            f"confident-{workload.name}-{row.backend}-{row.provider}")
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


def demo_precision(providers: list[str], work: Path, runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """The trained demo model on its phantom: speed and Dice of each CPU provider vs fp32 ONNX Runtime and truth."""
    import nibabel as nib
    import numpy as np

    from tsrt.demo.run import demo_model_dir, dice
    from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom

    phantom = make_phantom(**DEMO_PHANTOM)
    image = work / "inputs" / "demo_phantom.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), image)
    env = child_env((work, work / "demo_tsrt_home"))
    cpu_providers = [p for p in providers if p in CPU_PROVIDERS]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("expected", type=Path, help="the reference label map (NIfTI), e.g. official TotalSegmentator's")
    parser.add_argument("actual", type=Path, help="the label map to compare with it, on the same grid")
    args = parser.parse_args(argv)
    found = agreement_and_dice(args.expected, args.actual)
    print(json.dumps(found))
    return 0 if found["agreement"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
