"""Voxel agreement and mean Dice between two label maps, and the benchmark's accuracy checks built on them.

    python benchmarks/accuracy.py official.nii.gz tsrt.nii.gz       # one JSON line: agreement, Dice, classes

Random weights put near-tied logits everywhere, so float noise alone caps agreement between backends
at about RANDOM_WEIGHTS_FLOOR: that comparison (compare_outputs) shows the backends run the same
pipeline, not that they agree to the voxel, and says nothing about reduced precision (int8 graphs of
random weights are forced past their gate). Hence two more checks on weights whose labels have margins:
every row on "confident" weights (the trained demo model's backbone in TotalSegmentator's layout,
confident_accuracy: vs official TotalSegmentator, and each reduced precision vs fp32), and the demo
model itself on an unseen phantom (demo_precision: speed, each precision vs fp32, and vs the truth).
Reduced precision vs fp32 is precision_agreement: voxel agreement, and Dice per class with its mean and
minimum over the classes of >= LARGE_CLASS_VOXELS fp32 voxels (the accuracy gate's "large class", 1000).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed import run_backend, run_child
from tsrt.quantization.gate import LARGE_CLASS_VOXELS
from workloads import (
    CPU_PROVIDERS, DEMO_PHANTOM, Backend, TsrtRow, Workload, backends_for, child_env, demo_model_copy, install_int8,
    int8_form, output_path, prepare_input, store_models, tasks_for,
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


def precision_agreement(reference, labels, names: Mapping[int, str] | None = None,
                        min_voxels: int = LARGE_CLASS_VOXELS) -> dict[str, Any]:
    """A label map against its fp32 reference: voxel agreement, Dice per class (classes with >= min_voxels
    reference voxels), their mean and minimum (with the class), and how many classes that is."""
    from tsrt.quantization.gate import LabelCounts

    counts = LabelCounts()
    counts.add(reference, labels)
    names = names or {}
    per_class = {names.get(label, f"label_{label}"): counts.dice(label) for label in counts.present()
                 if counts.reference[label] >= min_voxels}
    lowest = min(per_class, key=per_class.get) if per_class else None
    return {
        "agreement": counts.agreeing / counts.voxels if counts.voxels else 1.0,
        "mean_dice": statistics.fmean(per_class.values()) if per_class else None,
        "min_dice": per_class[lowest] if lowest else None, "min_class": lowest, "classes": len(per_class),
        "min_voxels": min_voxels, "per_class": {name: round(dice, 5) for name, dice in per_class.items()},
    }


def precision_reference(row: TsrtRow, ran: Sequence[TsrtRow]) -> TsrtRow:
    """What a row is compared with: a reduced precision with its own engine's fp32 (the precision's effect
    alone), an fp32 row (and a reduced one whose engine has no fp32 run) with ONNX Runtime's CPU fp32."""
    provider, precision = row
    return (provider, "fp32") if precision != "fp32" and (provider, "fp32") in ran else ("cpu", "fp32")


def compare_precisions(labels: Mapping[TsrtRow, Any], names: Mapping[int, str] | None = None) -> dict[str, dict]:
    """precision_agreement of every row but cpu fp32 with its precision_reference, keyed "provider precision"."""
    found = {}
    for row in labels:
        reference = precision_reference(row, list(labels))
        if row != ("cpu", "fp32") and reference in labels:
            found[" ".join(row)] = {"provider": row[0], "precision": row[1], "reference": " ".join(reference),
                                    **precision_agreement(labels[reference], labels[row], names)}
    return found


def read_labels(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asanyarray(nib.load(path).dataobj)


def confident_accuracy(workloads: list[Workload], rows: list[TsrtRow], work: Path, small: bool = False,
                       with_official: bool = True) -> dict[str, dict[str, Any]]:
    """Every row once on confident weights: Dice vs official TotalSegmentator without the random-weights floor
    (`vs_official`, with_official), each reduced precision vs fp32 (`vs_fp32`), and the int8 graphs' gate
    numbers (`int8`: quantized on phantoms, forced past the gate when it refuses)."""
    from tsrt.models.registry import class_map

    tasks = tasks_for(workloads, with_nnunet=False)
    homes = store_models(work, "confident", tasks, small)
    with_int8 = any(precision == "int8" for _, precision in rows)
    int8 = install_int8(work, "confident", homes, tasks, int8_form(rows), small) if with_int8 else {}
    found: dict[str, dict[str, Any]] = {"vs_official": {}, "vs_fp32": {}, "int8": int8}
    for workload in workloads:
        image = prepare_input(work, workload)
        backends = backends_for(workload, rows, with_nnunet=False, low_memory=False)[0 if with_official else 1:]
        done = []
        for row in backends:
            try:
                run_backend(row, workload, image, homes, work, "confident", f"confident-{workload.name}-{row.tag}")
                done.append(row)
            except RuntimeError as err:
                print(f"  confident {workload.name} {row.label} FAILED: {str(err).splitlines()[0]}", flush=True)
        official = [row for row in done if row.backend == "official"]
        if official:
            reference = output_path(work, workload, official[0], "confident")
            found["vs_official"][workload.name] = {
                row.label: {"backend": row.backend, "provider": row.provider, "precision": row.precision,
                            **agreement_and_dice(reference, output_path(work, workload, row, "confident"))}
                for row in done if row.backend != "official"
            }
            print(f"  confident {workload.name}: " + ", ".join(
                f"{k} Dice {v['dice']:.4f}" for k, v in found["vs_official"][workload.name].items()), flush=True)
        labels = {(row.provider, row.precision): read_labels(output_path(work, workload, row, "confident"))
                  for row in done if row.backend == "tsrt"}
        found["vs_fp32"][workload.name] = compare_precisions(labels, class_map("total"))
        for key, row in found["vs_fp32"][workload.name].items():
            dice = "no class of 1000 voxels" if row["mean_dice"] is None else (
                f"mean Dice {row['mean_dice']:.4f}, min {row['min_dice']:.4f} ({row['min_class']})")
            print(f"  confident {workload.name} {key} vs {row['reference']}: agreement {row['agreement'] * 100:.3f} %, "
                  + dice, flush=True)
    return found


def demo_precision(rows: list[TsrtRow], work: Path, runs: int, warmup: int) -> tuple[dict[str, dict[str, Any]],
                                                                                        dict[str, dict[str, Any]]]:
    """The trained demo model on its unseen phantom, on every CPU row: speed vs fp32 ONNX Runtime, each precision
    vs its fp32 reference (precision_agreement) and Dice vs truth; and the int8 graph's gate numbers."""
    import nibabel as nib
    import numpy as np

    from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom
    from tsrt.demo.run import dice

    cpu_rows = [row for row in rows if row[0] in CPU_PROVIDERS]
    model_dir, int8 = demo_model_copy(work, int8_form(rows), with_int8=any(q == "int8" for _, q in cpu_rows))
    phantom = make_phantom(**DEMO_PHANTOM)
    image = work / "inputs" / "demo_phantom.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), image)
    env = child_env((work, work / "demo_tsrt_home"))
    walls: dict[TsrtRow, list[float]] = {row: [] for row in cpu_rows}
    outputs = {row: work / "outputs" / f"demo-{'-'.join(row)}.nii.gz" for row in cpu_rows}
    for round_index in range(warmup + runs):
        for row in cpu_rows:
            provider, precision = row
            job = {"backend": "tsrt-model", "input": str(image), "output": str(outputs[row]),
                   "model_dir": str(model_dir), "provider": provider, "precision": precision, "step_size": 0.5,
                   "label": f"demo-{provider}-{precision}-r{round_index}"}
            result = run_child(job, work, env)
            if round_index >= warmup:
                walls[row].append(result["stages"]["inference"])
    labels = {row: read_labels(path) for row, path in outputs.items()}
    versus_fp32 = compare_precisions(labels, PHANTOM_LABELS)
    cpu_fp32 = statistics.median(walls[("cpu", "fp32")])
    found = {}
    for row in cpu_rows:
        key = " ".join(row)
        found[key] = {
            "provider": row[0], "precision": row[1], "inference_s": statistics.median(walls[row]),
            "speedup_vs_cpu": cpu_fp32 / statistics.median(walls[row]),
            **{name: versus_fp32[key][name] for name in ("reference", "agreement", "mean_dice", "min_dice", "min_class",
                                                         "classes", "per_class") if key in versus_fp32},
            "dice_vs_truth": float(np.mean([dice(phantom.labels == v, labels[row] == v) for v in PHANTOM_LABELS
                                            if (phantom.labels == v).any()])),
        }
    return found, int8


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
