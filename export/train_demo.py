"""Train tsrt's bundled demo model: a real nnU-Net v2 model, trained here by nnunetv2's own trainer.

Run (dev install, `make dev`):

    python -m tsrt_export.train_demo --out models/demo

What it does, all through nnunetv2's own Python API (no re-implementation of nnU-Net):

1. Writes ~30 synthetic CT phantoms (`tsrt.demo.phantom.make_phantom(..., vary=True)`) at isotropic
   3 mm as an nnU-Net raw dataset `Dataset900_TsrtDemo` (CT channel, so CTNormalization is used)
   into a work folder, with nnUNet_raw / nnUNet_preprocessed / nnUNet_results pointing into it.
2. Fingerprint extraction and experiment planning (`ExperimentPlanner`, plans name
   `nnUNetPlans`), then shrinks the 3d_fullres configuration to a small network before
   preprocessing: PlainConvUNet, 4 stages, 8/16/32/64 features, 3x3x3 kernels, strides
   1,2,2,2, patch 64^3, batch size 2. The planned spacing stays nnU-Net's own (3 mm).
3. Trains it on the CPU with a short-schedule subclass of nnunetv2's trainer, then runs
   nnU-Net's own validation of the fold.
4. Copies the result folder (plans.json, dataset.json, dataset_fingerprint.json,
   fold_0/checkpoint_final.pth without the optimizer state, training log, progress.png,
   validation summary) to `<out>/nnUNet_results/Dataset900_TsrtDemo/
   nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/`.
5. In a fresh process, loads that committed folder with nnunetv2's `nnUNetPredictor` and
   segments unseen phantoms (other seeds, a non-isotropic one and the default demo phantom),
   computes Dice per class against the phantom ground truth and writes `<out>/TRAINING.md`.

Choices, and why:

* Trainer class name `nnUNetTrainerNoMirroring`. The checkpoint records the trainer's class
  name and `nnUNetPredictor.initialize_from_trained_model_folder` looks that name up inside
  the installed nnunetv2 package to build the network. Our class subclasses nnunetv2's shipped
  `nnUNetTrainerNoMirroring` and changes only the training length (epochs and iterations), so
  the name resolves to nnunetv2's own class in any fresh process, with an identical
  architecture, and no `nnUNet_extTrainer` is needed. No mirroring (neither as augmentation
  nor as test-time augmentation: the checkpoint records `inference_allowed_mirroring_axes=None`)
  because the label set has left/right pairs (kidneys, lungs): mirroring would teach the
  network to swap them. That is also why TotalSegmentator trains with this trainer, so
  the demo folder is laid out and named exactly like a TotalSegmentator model folder.
* Fold 0 of nnU-Net's own seeded 5-fold split (24 training / 6 validation cases), not
  fold 'all': `nnUNetPredictor.auto_detect_available_folds` ignores `fold_all`, so a
  fold_0 folder works with every default caller (`nnUNetv2_predict -f 0`, TotalSegmentator-style
  loaders, tsrt's exporter); nnU-Net's own validation of the held-out fold is a
  real check of the training; and 24 synthetic cases already cover the phantom's variety. The
  independent evaluation on unseen seeds below is what TRAINING.md reports.
* Training shapes around (110-135, 80-105, 90-110) voxels at 3 mm: the upper x/y range
  covers the field of view of the default demo phantom (160x128x100 at 2.5x2.5x3 mm, i.e.
  400x320x300 mm = 133x107x100 voxels at 3 mm), so the model has seen air around the body.

Input convention of the model (nnU-Net's SimpleITK reader, recorded in plans.json): an array
`(channels, z, y, x)` of the stored NIfTI voxels with spacing `(sz, sy, sx)`. A phantom indexed
`(x, y, z)` goes in as `image.transpose(2, 1, 0)[None]` (see `predict_phantom`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 900
DATASET_NAME = "Dataset900_TsrtDemo"
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
TRAINER_NAME = "nnUNetTrainerNoMirroring"
FOLD = 0
RESULT_SUBDIR = f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"

# Training schedule (the trainer's own hyperparameters; the defaults are 1000 x 250 / 50).
NUM_EPOCHS = 60
ITERATIONS_PER_EPOCH = 50
VAL_ITERATIONS_PER_EPOCH = 3

NUM_CASES = 48
#: How many of the NUM_CASES have a small field of view that cuts the body and the kidneys (the CI phantom's kind).
NUM_SMALL_FOV_CASES = 8
TRAIN_SPACING = (3.0, 3.0, 3.0)
#: Air around the phantom's body is -1000 HU (+- noise); everything inside, lung included, is above -890 HU.
OUTSIDE_BODY_HU = -910.0
#: Inclusive voxel ranges of the training phantoms' shapes (x, y, z) at TRAIN_SPACING.
TRAIN_SHAPE_RANGE = ((110, 165), (80, 135), (90, 115))
#: The same for the small-field-of-view cases: narrower than the body, and too short for the whole kidneys.
SMALL_FOV_SHAPE_RANGE = ((88, 110), (70, 90), (56, 76))

# The small network written into the 3d_fullres plans.
PATCH_SIZE = [64, 64, 64]
BATCH_SIZE = 2
FEATURES = [8, 16, 32, 64]
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
KERNELS = [[3, 3, 3]] * 4

# Unseen evaluation phantoms: (name, make_phantom kwargs). No seed here is a training seed
# (training uses seeds 0..NUM_CASES-1 with vary=True; the default demo phantom is vary=False).
EVAL_PHANTOMS: list[tuple[str, dict]] = [
    ("vary seed 1000, 118x88x100 @ 3 mm", dict(shape=(118, 88, 100), spacing=(3.0, 3.0, 3.0), seed=1000, vary=True)),
    ("vary seed 1001, 126x100x96 @ 3 mm", dict(shape=(126, 100, 96), spacing=(3.0, 3.0, 3.0), seed=1001, vary=True)),
    ("vary seed 1002, 170x130x86 @ 2x2x3.5 mm", dict(shape=(170, 130, 86), spacing=(2.0, 2.0, 3.5), seed=1002, vary=True)),
    ("default demo phantom make_phantom(): 160x128x100 @ 2.5x2.5x3 mm", dict()),
    ("CI test phantom, vary seed 4242, 96x80x64 @ 3 mm", dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=4242, vary=True)),
]


# --------------------------------------------------------------------------------------------
# environment


def _set_nnunet_env(work: Path, n_proc_da: int) -> None:
    """nnunetv2 reads these at import time, so this must run before any nnunetv2 import."""
    if "nnunetv2" in sys.modules:
        raise RuntimeError("nnunetv2 was imported before its environment was set")
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / sub)
    os.environ["nnUNet_n_proc_DA"] = str(n_proc_da)
    os.environ["nnUNet_def_n_proc"] = "2"
    os.environ["nnUNet_compile"] = "false"


# --------------------------------------------------------------------------------------------
# dataset


def training_cases(n: int = NUM_CASES) -> list[dict]:
    """The make_phantom arguments of the training cases (deterministic)."""
    rng = np.random.default_rng(20241125)
    cases = []
    for i in range(n):
        # Fields of view from tight (the body fills the slice) to wide (as much air around the body as
        # the demo phantom has), so the network learns that air outside the body is not lung; the last
        # few are smaller than the body and cut the kidneys, as a short scan does.
        ranges = SMALL_FOV_SHAPE_RANGE if i >= n - min(NUM_SMALL_FOV_CASES, n // 4) else TRAIN_SHAPE_RANGE
        shape = tuple(int(rng.integers(low, high + 1)) for low, high in ranges)
        cases.append(dict(shape=shape, spacing=TRAIN_SPACING, seed=i, vary=True))
    return cases


def write_raw_dataset(raw_root: Path, n: int = NUM_CASES) -> Path:
    import nibabel as nib

    from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom

    ds = raw_root / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, kwargs in enumerate(training_cases(n)):
        ph = make_phantom(**kwargs)
        case = f"tsrtdemo_{i:03d}"
        for arr, path in ((ph.image, ds / "imagesTr" / f"{case}_0000.nii.gz"),
                          (ph.labels, ds / "labelsTr" / f"{case}.nii.gz")):
            img = nib.Nifti1Image(arr, ph.affine)
            img.set_qform(ph.affine, code=1)
            img.set_sform(ph.affine, code=1)
            nib.save(img, str(path))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: int(k) for k, name in sorted(PHANTOM_LABELS.items())}},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": DATASET_NAME,
        "description": "Synthetic CT phantoms from tsrt.demo.phantom.make_phantom(vary=True), 3 mm isotropic.",
        "licence": "Apache-2.0",
    }
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ds


# --------------------------------------------------------------------------------------------
# planning


def shrink_plans(plans_file: Path) -> dict:
    """Edit the 3d_fullres configuration of nnU-Net's plans to the small demo network."""
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][CONFIGURATION]
    cfg["patch_size"] = list(PATCH_SIZE)
    cfg["batch_size"] = BATCH_SIZE
    arch = cfg["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    kw = arch["arch_kwargs"]
    n = len(FEATURES)
    kw["n_stages"] = n
    kw["features_per_stage"] = list(FEATURES)
    kw["kernel_sizes"] = [list(k) for k in KERNELS]
    kw["strides"] = [list(s) for s in STRIDES]
    kw["n_conv_per_stage"] = [2] * n
    kw["n_conv_per_stage_decoder"] = [2] * (n - 1)
    for key in ("n_blocks_per_stage",):  # residual-encoder keys, not PlainConvUNet's
        kw.pop(key, None)
    # A 3d_lowres cascade makes no sense for images this small; the planner should not make
    # one, but make sure nothing points at it.
    plans["configurations"].pop("3d_lowres", None)
    plans["configurations"].pop("3d_cascade_fullres", None)
    plans_file.write_text(json.dumps(plans, indent=4))
    return plans


def plan_and_preprocess() -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2.paths import nnUNet_preprocessed

    extract_fingerprints([DATASET_ID], num_processes=2, check_dataset_integrity=True,
                         show_progress_bar=False)
    plans_identifier = plan_experiments([DATASET_ID])
    assert plans_identifier == PLANS_NAME, plans_identifier
    plans = shrink_plans(Path(nnUNet_preprocessed) / DATASET_NAME / f"{PLANS_NAME}.json")
    spacing = plans["configurations"][CONFIGURATION]["spacing"]
    assert np.allclose(spacing, TRAIN_SPACING), f"planned spacing {spacing} is not 3 mm"
    preprocess([DATASET_ID], PLANS_NAME, configurations=(CONFIGURATION,), num_processes=(2,),
               show_progress_bar=False)
    return plans


# --------------------------------------------------------------------------------------------
# training


def make_trainer_class(num_epochs: int, iterations: int, val_iterations: int):
    """A subclass of nnunetv2's nnUNetTrainerNoMirroring, named like it, that trains shorter.

    It keeps nnUNetTrainer's __init__ signature; only the training length changes, so the
    architecture nnUNetPredictor builds from nnunetv2's own class of this name is identical.
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring as _ShippedNoMirroring)

    class nnUNetTrainerNoMirroring(_ShippedNoMirroring):  # noqa: N801 (nnU-Net's naming)
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = num_epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.save_every = 1  # checkpoint_latest.pth every epoch: a stopped session resumes (--resume)

    assert nnUNetTrainerNoMirroring.__name__ == TRAINER_NAME
    return nnUNetTrainerNoMirroring


def train(num_epochs: int, iterations: int, val_iterations: int, resume: bool = False) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    trainer_cls = make_trainer_class(num_epochs, iterations, val_iterations)
    pre = Path(nnUNet_preprocessed) / DATASET_NAME
    plans = load_json(str(pre / f"{PLANS_NAME}.json"))
    plans["continue_training"] = resume  # nnUNetTrainer.__init__ pops this key (run_training sets it)
    dataset_json = load_json(str(pre / "dataset.json"))
    trainer = trainer_cls(plans=plans, configuration=CONFIGURATION, fold=FOLD,
                          dataset_json=dataset_json, device=torch.device("cpu"))
    fresh_optimizer = False
    if resume:  # what nnUNetv2_train --c does: carry on from the last checkpoint up to num_epochs
        ckpt = Path(trainer.output_folder) / "checkpoint_final.pth"
        if not ckpt.exists():
            ckpt = Path(trainer.output_folder) / "checkpoint_latest.pth"
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        if checkpoint.get("optimizer_state") is None:
            # An exported (stripped) checkpoint: carry on from its weights with a fresh SGD state.
            trainer.initialize()
            checkpoint["optimizer_state"] = trainer.optimizer.state_dict()
            fresh_optimizer = True
            ckpt = ckpt.with_name("checkpoint_resume.pth")
            torch.save(checkpoint, ckpt)
            print("[train_demo] checkpoint has no optimizer state: SGD momentum starts afresh", flush=True)
        trainer.load_checkpoint(str(ckpt))
        print(f"[train_demo] resuming from {ckpt.name} at epoch {trainer.current_epoch}", flush=True)
    t0 = time.perf_counter()
    trainer.run_training()
    wall_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.perform_actual_validation(False)
    val_s = time.perf_counter() - t0
    splits = load_json(str(pre / "splits_final.json"))
    logger = trainer.logger
    pseudo = logger.get_value("dice_per_class_or_region", step=-1)
    starts = logger.get_value("epoch_start_timestamps", step=None)
    ends = logger.get_value("epoch_end_timestamps", step=None)
    return {
        # nnU-Net's own logged epoch times, summed over all epochs (also across a --resume)
        "train_seconds": float(sum(e - b for b, e in zip(starts, ends))),
        "wall_seconds_last_invocation": wall_s,
        "resumed": resume,
        "resume_fresh_optimizer": fresh_optimizer,
        "validation_seconds": val_s,
        "epochs": num_epochs,
        "iterations_per_epoch": iterations,
        "val_iterations_per_epoch": val_iterations,
        "iterations": num_epochs * iterations,
        "n_train_cases": len(splits[FOLD]["train"]),
        "n_val_cases": len(splits[FOLD]["val"]),
        "final_train_loss": float(logger.get_value("train_losses", step=-1)),
        "final_val_loss": float(logger.get_value("val_losses", step=-1)),
        "final_pseudo_dice": [float(x) for x in pseudo],
        "output_folder": trainer.output_folder_base,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# export


def export_result_folder(src: Path, dst: Path) -> dict:
    """Copy the small parts of nnU-Net's result folder; strip the optimizer state."""
    import torch

    if dst.exists():
        shutil.rmtree(dst)
    (dst / f"fold_{FOLD}").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy2(src / name, dst / name)
    fold_src = src / f"fold_{FOLD}"
    for log in sorted(fold_src.glob("training_log_*.txt")):  # one per invocation (more after --resume)
        shutil.copy2(log, dst / f"fold_{FOLD}" / log.name)
    png = fold_src / "progress.png"
    if png.exists() and png.stat().st_size < 400_000:
        shutil.copy2(png, dst / f"fold_{FOLD}" / "progress.png")
    summary = fold_src / "validation" / "summary.json"
    if summary.exists():
        (dst / f"fold_{FOLD}" / "validation").mkdir()
        shutil.copy2(summary, dst / f"fold_{FOLD}" / "validation" / "summary.json")

    ckpt_src = fold_src / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_src, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER_NAME, ckpt["trainer_name"]
    ckpt["optimizer_state"] = None  # only needed to continue training; nnUNetPredictor never reads it
    ckpt["grad_scaler_state"] = None
    ckpt_dst = dst / f"fold_{FOLD}" / "checkpoint_final.pth"
    torch.save(ckpt, ckpt_dst)
    return {"checkpoint_bytes_full": ckpt_src.stat().st_size, "checkpoint_bytes": ckpt_dst.stat().st_size}


# --------------------------------------------------------------------------------------------
# evaluation (nnunetv2's own predictor on the committed folder)


def load_predictor(model_folder: Path):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(FOLD,),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def predict_phantom(predictor, phantom) -> np.ndarray:
    """Segment a tsrt Phantom (x, y, z) with nnUNetPredictor; returns labels in (x, y, z)."""
    image = phantom.image.transpose(2, 1, 0)[None].astype(np.float32)  # SimpleITK order (c, z, y, x)
    props = {"spacing": [float(s) for s in phantom.spacing[::-1]]}
    seg = predictor.predict_single_npy_array(image, props, None, None, False)
    return np.asarray(seg).transpose(2, 1, 0)


def dice_per_class(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    from tsrt.demo.phantom import PHANTOM_LABELS

    out = {}
    for k, name in PHANTOM_LABELS.items():
        p, g = pred == k, gt == k
        denom = int(p.sum()) + int(g.sum())
        out[name] = float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom
    return out


def evaluate(model_folder: Path) -> dict:
    from tsrt.demo.phantom import make_phantom

    t0 = time.perf_counter()
    predictor = load_predictor(model_folder)
    load_s = time.perf_counter() - t0
    rows = []
    for name, kwargs in EVAL_PHANTOMS:
        ph = make_phantom(**kwargs)
        t0 = time.perf_counter()
        pred = predict_phantom(predictor, ph)
        secs = time.perf_counter() - t0
        assert pred.shape == ph.labels.shape
        rows.append({"name": name, "kwargs": kwargs, "seconds": secs, "dice": dice_per_class(pred, ph.labels),
                     "labelled_outside_body": int(((pred > 0) & (ph.image < OUTSIDE_BODY_HU)).sum())})
        print(f"[eval] {name}: {secs:.1f} s, " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["dice"].items()),
              flush=True)
    return {"load_seconds": load_s, "rows": rows, "trainer_name": predictor.trainer_name,
            "mirroring_axes": predictor.allowed_mirroring_axes}


# --------------------------------------------------------------------------------------------
# report


def _hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (shared with other jobs), no GPU; {platform.system()} {platform.machine()}"


def write_report(out: Path, info: dict, ev: dict) -> None:
    import nnunetv2  # noqa: F401  (version below)
    import torch
    from importlib.metadata import version

    from tsrt.demo.phantom import PHANTOM_LABELS

    plans = json.loads((out / "nnUNet_results" / DATASET_NAME / RESULT_SUBDIR / "plans.json").read_text())
    fp = json.loads((out / "nnUNet_results" / DATASET_NAME / RESULT_SUBDIR / "dataset_fingerprint.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    kw = cfg["architecture"]["arch_kwargs"]
    folder = out / "nnUNet_results" / DATASET_NAME / RESULT_SUBDIR
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    folder_bytes = sum((folder / f).stat().st_size for f in files)
    names = list(PHANTOM_LABELS.values())

    def fmt(v: float) -> str:
        return "–" if v != v else f"{v:.3f}"

    lines = [
        "# tsrt demo model: how it was trained",
        "",
        "A real nnU-Net v2 model, trained on this project's machine by nnunetv2's own trainer on",
        "synthetic CT phantoms (`tsrt.demo.phantom.make_phantom(vary=True)`). Written by",
        "`export/train_demo.py`; do not edit by hand, re-run the script.",
        "",
        "## Command",
        "",
        "```",
        "python -m tsrt_export.train_demo --out models/demo",
        "```",
        *([
            "",
            f"The training was then carried on to {info['epochs']} epochs with nnU-Net's own continue mechanism",
            "(what `nnUNetv2_train --c` does; the poly learning rate follows the new epoch count from there"
            + ("; it started from the exported checkpoint, whose optimizer state is stripped, so the SGD "
               "momentum restarted" if info.get("resume_fresh_optimizer") else "") + "):",
            "",
            "```",
            f"python -m tsrt_export.train_demo --out models/demo --work-dir <same work dir> --resume --epochs {info['epochs']}",
            "```",
        ] if info.get("resumed") else []),
        "",
        "(in the dev environment, `make dev`; "
        f"nnunetv2 {version('nnunetv2')}, torch {torch.__version__}, Python {platform.python_version()})",
        "",
        "## Result folder",
        "",
        f"`models/demo/nnUNet_results/{DATASET_NAME}/{RESULT_SUBDIR}/` "
        f"({folder_bytes / 1e6:.2f} MB in all):",
        "",
        *[f"- `{f}`" + (f" ({info['checkpoint_bytes'] / 1e6:.2f} MB; the optimizer state is stripped from the "
                        f"{info['checkpoint_bytes_full'] / 1e6:.2f} MB original)" if f.endswith("checkpoint_final.pth")
                        else "") for f in files],
        "",
        f"Trainer class recorded in the checkpoint: `{TRAINER_NAME}` (nnunetv2 ships a class of this name;",
        "ours subclasses it and only shortens training, so `nnUNetPredictor` builds the identical network).",
        "No mirroring in training or at inference (`inference_allowed_mirroring_axes` is None): the labels",
        "have left/right pairs.",
        "",
        "## Training",
        "",
        f"- Data: {NUM_CASES} phantoms, seeds 0-{NUM_CASES - 1}, `vary=True`, isotropic 3 mm, shapes "
        f"{' x '.join(f'{low}-{high}' for low, high in TRAIN_SHAPE_RANGE)} voxels, of which the last {NUM_SMALL_FOV_CASES} "
        f"{' x '.join(f'{low}-{high}' for low, high in SMALL_FOV_SHAPE_RANGE)} (smaller than the body, kidneys cut); "
        "nnU-Net's 5-fold split, "
        f"fold {FOLD}" + (f" ({info['n_train_cases']} training / {info['n_val_cases']} validation cases)."
                          if "n_train_cases" in info else "."),
        f"- Schedule: {info['epochs']} epochs x {info['iterations_per_epoch']} iterations = "
        f"**{info['iterations']} training iterations** (batch size {cfg['batch_size']}), "
        f"{info['val_iterations_per_epoch']} validation iterations per epoch; SGD, poly LR from 0.01 "
        "(nnU-Net defaults).",
        f"- Wall-clock training time: **{info['train_seconds']:.0f} s** ({info['train_seconds'] / 60:.1f} min; the sum of "
        f"nnU-Net's logged epoch times, {info['train_seconds'] / info['iterations']:.2f} s per training iteration "
        "including the validation iterations; the 2 cores were shared with other jobs throughout); "
        f"nnU-Net's own validation of fold {FOLD} afterwards: {info['validation_seconds']:.0f} s.",
        f"- Hardware: {_hardware()}; torch threads {info['torch_threads']}, "
        f"nnUNet_n_proc_DA={info['n_proc_da']}.",
        f"- Final train loss {info['final_train_loss']:.3f}, val loss {info['final_val_loss']:.3f}; final pseudo "
        "Dice per class: " + ", ".join(f"{n} {d:.3f}" for n, d in zip(names, info["final_pseudo_dice"])) + ".",
        "",
        "## Plan (3d_fullres, plans name nnUNetPlans)",
        "",
        f"- Spacing {cfg['spacing']} mm (nnU-Net's own plan), median image size "
        f"{cfg['median_image_size_in_voxels']}, transpose_forward {plans['transpose_forward']}",
        f"- Normalization {cfg['normalization_schemes']} with the fingerprint's foreground intensities "
        f"(mean {fp['foreground_intensity_properties_per_channel']['0']['mean']:.1f} HU, "
        f"0.5-99.5 percentiles {fp['foreground_intensity_properties_per_channel']['0']['percentile_00_5']:.0f} to "
        f"{fp['foreground_intensity_properties_per_channel']['0']['percentile_99_5']:.0f} HU)",
        f"- Network `{cfg['architecture']['network_class_name'].rsplit('.', 1)[-1]}`: {kw['n_stages']} stages, "
        f"features {kw['features_per_stage']}, kernels {kw['kernel_sizes'][0]}, strides {kw['strides']}, "
        f"{kw['n_conv_per_stage'][0]} convs per stage, {kw['norm_op'].rsplit('.', 1)[-1]}, "
        f"{kw['nonlin'].rsplit('.', 1)[-1]}, deep supervision in training",
        f"- Patch size {cfg['patch_size']}, batch size {cfg['batch_size']}",
        "",
        "## Dice on unseen phantoms",
        "",
        "nnunetv2's `nnUNetPredictor` (CPU, tile step 0.5, Gaussian weighting, no mirroring) loading the",
        "committed folder in a fresh process; Dice of the prediction against the phantom's ground truth,",
        "in the phantom's own grid (nnU-Net resamples to 3 mm and back). None of these phantoms was a",
        "training case. Model input axis order: the NIfTI voxels as SimpleITK gives them,",
        "`(z, y, x)`, spacing `(sz, sy, sx)`.",
        "",
        "| class | " + " | ".join(f"#{i + 1}" for i in range(len(ev["rows"]))) + " | mean |",
        "| --- | " + " | ".join("---:" for _ in ev["rows"]) + " | ---: |",
    ]
    means = {}
    for n in names:
        vals = [r["dice"][n] for r in ev["rows"]]
        finite = [v for v in vals if v == v]
        means[n] = float(np.mean(finite)) if finite else float("nan")
        lines.append(f"| {n} | " + " | ".join(fmt(v) for v in vals) + f" | **{fmt(means[n])}** |")
    if all("labelled_outside_body" in r for r in ev["rows"]):
        counts = [r["labelled_outside_body"] for r in ev["rows"]]
        lines.append("| voxels labelled outside the body | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    lines += ["", "Phantoms (`make_phantom` arguments) and prediction time on this machine:", ""]
    for i, r in enumerate(ev["rows"]):
        lines.append(f"{i + 1}. {r['name']}: `{r['kwargs'] or 'defaults'}`, {r['seconds']:.1f} s")
    lines += ["", f"Predictor set-up (load of the folder): {ev['load_seconds']:.1f} s. "
              "'–' means the class is absent from both ground truth and prediction in that field of view. "
              f"Outside the body: labelled voxels whose phantom value is below {OUTSIDE_BODY_HU:.0f} HU (the air "
              "around the body; every tissue inside it, lung included, is brighter).", ""]
    summary = out / "nnUNet_results" / DATASET_NAME / RESULT_SUBDIR / f"fold_{FOLD}" / "validation" / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        per = s.get("mean", {})
        lines += ["## nnU-Net's own validation (fold 0 held-out cases)", "",
                  "From `fold_0/validation/summary.json`: "
                  + ", ".join(f"{PHANTOM_LABELS[int(k)]} {v['Dice']:.3f}" for k, v in sorted(per.items(), key=lambda x: int(x[0])))
                  + f"; foreground mean Dice {s['foreground_mean']['Dice']:.3f}.", ""]
    lines += [f"Generated {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))
    (out / "training_info.json").write_text(json.dumps(
        {"training": {k: v for k, v in info.items() if k != "output_folder"},
         "evaluation": ev, "mean_dice": means}, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models/demo"), help="where the model folder goes")
    ap.add_argument("--work-dir", type=Path, default=None, help="nnU-Net work folder (default: a temp dir)")
    ap.add_argument("--cases", type=int, default=NUM_CASES)
    ap.add_argument("--epochs", type=int, default=NUM_EPOCHS)
    ap.add_argument("--iterations", type=int, default=ITERATIONS_PER_EPOCH)
    ap.add_argument("--val-iterations", type=int, default=VAL_ITERATIONS_PER_EPOCH)
    ap.add_argument("--n-proc-da", type=int, default=1, help="nnUNet_n_proc_DA (0: augment in the main process)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the training in --work-dir up to --epochs (nnU-Net's --c), then export")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite TRAINING.md from the training_info.json already in --out")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="only evaluate the folder already in --out and print JSON (used in a fresh process)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    model_folder = out / "nnUNet_results" / DATASET_NAME / RESULT_SUBDIR

    if args.report_only:
        recorded = json.loads((out / "training_info.json").read_text())
        write_report(out, recorded["training"], recorded["evaluation"])
        return 0

    if args.evaluate_only:
        _set_nnunet_env(Path(tempfile.mkdtemp(prefix="tsrt_demo_eval_")), args.n_proc_da)
        ev = evaluate(model_folder)
        print("EVAL_JSON " + json.dumps(ev, default=str))
        return 0

    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="tsrt_demo_train_"))
    _set_nnunet_env(work, args.n_proc_da)
    print(f"[train_demo] work dir {work}", flush=True)

    if args.resume:
        if not args.work_dir:
            raise SystemExit("--resume needs --work-dir (the folder of the training to continue)")
    else:
        t0 = time.perf_counter()
        write_raw_dataset(Path(os.environ["nnUNet_raw"]), args.cases)
        print(f"[train_demo] wrote {args.cases} phantoms in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        plan_and_preprocess()
        print(f"[train_demo] planned + preprocessed in {time.perf_counter() - t0:.0f} s", flush=True)

    info = train(args.epochs, args.iterations, args.val_iterations, resume=args.resume)
    info["n_proc_da"] = args.n_proc_da
    print(f"[train_demo] trained {info['iterations']} iterations in {info['train_seconds']:.0f} s", flush=True)

    info.update(export_result_folder(Path(info["output_folder"]), model_folder))
    print(f"[train_demo] exported to {model_folder} (checkpoint {info['checkpoint_bytes'] / 1e6:.2f} MB)", flush=True)

    # Evaluate in a fresh process: proves nnUNetPredictor loads the committed folder on its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    proc = subprocess.run([sys.executable, "-m", "tsrt_export.train_demo", "--out", str(out), "--evaluate-only"],
                          env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        raise SystemExit("evaluation in a fresh process failed")
    ev = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("EVAL_JSON ")][-1][len("EVAL_JSON "):])
    write_report(out, info, ev)
    print(f"[train_demo] wrote {out / 'TRAINING.md'}", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
