"""Companion resources in the model store: the classifiers, networks and atlas TotalSegmentator's side tools use.

TotalSegmentator ships some inside its Python package (a pickle of xgboost regressors for the
contrast phase, xgboost models for the modality, a brain CT atlas for the Evans index) and keeps
others in its weights folder (the body-stats predictors of `totalseg_get_body_stats`: xgboost
models from a GitHub release zip, ResNet3D checkpoints from the license server). tsrt never
imports totalsegmentator and never unpickles anything at run time, so the export toolchain
(`tsrt models import NAME`) converts them once into plain files here::

    $TSRT_HOME/models/resources/
        phase/           fold_0.json ... fold_4.json            (xgboost's JSON model format)
        modality/        intensity_fold_N.json, normalized_fold_N.json
        evans-index/     ct_brain_atlas_1mm.nii.gz
        body_stats_xgb/  <target>_<ct|mr>_fold_N.json           (weight, size, age, sex)
        body_stats_ct/   fold_N.onnx, fold_N.json               (ResNet3D graph, its preprocessing)
        body_stats_mr/   (the same for MR)
        <each>/manifest.json   sha256 of every file, and where it came from

The body-stats resources can also be fetched like models (`tsrt models download NAME`, and on first
use from the TotalSegmentator home or the network: tsrt.models.first_use).

A resource folder enters the store only complete (staged, then renamed into place), and every
file is re-hashed against the manifest before use: a damaged or edited classifier fails with one
line instead of silently changing a result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tsrt.errors import ModelError
from tsrt.models.store import STAGING_PREFIX, models_root, sha256_file, staging

RESOURCES_FOLDER = "resources"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ResourceSpec:
    """One companion resource: its store folder, the files it holds and what it is for."""

    name: str  # also the `tsrt models import` argument
    files: tuple[str, ...]
    what: str  # for messages: "the contrast phase classifiers"
    extra: str | None = None  # the pip extra whose package reads these files
    #: Where TotalSegmentator keeps it, relative to its weights folder (home/nnunet/results); None: in its package.
    totalseg_folder: str | None = None
    release: str | None = None  # the GitHub release whose zip `<last part of totalseg_folder>.zip` holds it
    license_task: str | None = None  # ...or the task the license server sends it for
    needs_torch: bool = False  # converting it needs the export extra (a checkpoint made into ONNX)


RESOURCES: dict[str, ResourceSpec] = {
    "phase": ResourceSpec(
        "phase", tuple(f"fold_{k}.json" for k in range(5)), "the contrast phase classifiers", "phase"
    ),
    "modality": ResourceSpec(
        "modality",
        tuple(f"{kind}_fold_{k}.json" for kind in ("intensity", "normalized") for k in range(5)),
        "the modality classifiers",
        "phase",
    ),
    "evans-index": ResourceSpec("evans-index", ("ct_brain_atlas_1mm.nii.gz",), "the brain CT atlas of the Evans index"),
}

#: totalseg_get_body_stats's predictors: what they predict, the ensembled folds, the modalities.
BODY_STATS_TARGETS = ("weight", "size", "age", "sex")
BODY_STATS_FOLDS = tuple(range(5))
BODY_STATS_MODALITIES = ("ct", "mr")
#: TotalSegmentator's folders (its map_tasks_config: body_stats_xgb, body_stats_ct, body_stats_mr).
BODY_STATS_XGB_FOLDER = "body_stats_models_2026_03_24"
BODY_STATS_CNN_FOLDERS = {
    "ct": "lightning_models/ct_all_ext_splitOrig_noise_can1_huber",
    "mr": "lightning_models/mr_all_ext_splitOrig_noise_can1_huber",
}


def body_stats_xgb_file(target: str, modality: str, fold: int) -> str:
    """The store's name of one fold of one body-stats xgboost predictor."""
    return f"{target}_{modality}_fold_{fold}.json"


def body_stats_cnn_name(modality: str) -> str:
    return f"body_stats_{modality}"


RESOURCES["body_stats_xgb"] = ResourceSpec(
    "body_stats_xgb",
    tuple(body_stats_xgb_file(t, m, k) for m in BODY_STATS_MODALITIES for t in BODY_STATS_TARGETS for k in BODY_STATS_FOLDS),
    "the body-stats xgboost predictors",
    "phase",
    totalseg_folder=BODY_STATS_XGB_FOLDER,
    release="v2.5.0-weights",
)
RESOURCES.update({
    body_stats_cnn_name(modality): ResourceSpec(
        body_stats_cnn_name(modality),
        tuple(f"fold_{k}.{ending}" for k in BODY_STATS_FOLDS for ending in ("onnx", "json")),
        f"the body-stats networks ({modality.upper()})",
        totalseg_folder=folder,
        license_task=body_stats_cnn_name(modality),
        needs_torch=True,
    )
    for modality, folder in BODY_STATS_CNN_FOLDERS.items()
})


def resource_spec(name: str) -> ResourceSpec:
    try:
        return RESOURCES[name]
    except KeyError:
        raise ModelError(f"Unknown resource {name!r}: choose one of {', '.join(RESOURCES)}.") from None


def resource_dir(name: str, root: Path | None = None) -> Path:
    return models_root(root) / RESOURCES_FOLDER / resource_spec(name).name


def import_hint(spec: ResourceSpec) -> str:
    """The commands that install a resource, for the one-line errors that say it is missing."""
    if spec.totalseg_folder is None:
        return f"run `tsrt models import {spec.name}` (it reads them from an installed totalsegmentator package)"
    export = " (needs the export extra: pip install '.[export]' ./export)" if spec.needs_torch else ""
    licensed = ", with a license key stored by `tsrt models set-license KEY`" if spec.license_task else ""
    return (
        f"run `tsrt models import {spec.name} --totalseg-home DIR` with a TotalSegmentator home holding "
        f"{spec.totalseg_folder}, or `tsrt models download {spec.name}`{licensed}{export}"
    )


def verified_files(name: str, root: Path | None = None) -> dict[str, Path]:
    """The resource's files by name, each checked against the sha256 recorded when it was imported."""
    spec = resource_spec(name)
    folder = resource_dir(name, root)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(
            f"{spec.what.capitalize()} are not in the model store {models_root(root)}: {import_hint(spec)}."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded: Mapping[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{manifest_path} is unreadable: {import_hint(spec)} again.") from None
    files: dict[str, Path] = {}
    for file_name in spec.files:
        path = folder / file_name
        if file_name not in recorded or not path.is_file():
            raise ModelError(f"{spec.what.capitalize()} in {folder} lack {file_name}: {import_hint(spec)} again.")
        if sha256_file(path) != recorded[file_name]:
            raise ModelError(
                f"{path} does not match the checksum recorded at import (damaged or edited): "
                f"{import_hint(spec)} again."
            )
        files[file_name] = path
    return files


def install_resource(
    name: str, staged_files: Mapping[str, Path], source: Mapping[str, str], root: Path | None = None
) -> Path:
    """Copy the converted files into the store with their manifest, replacing an older copy in one rename."""
    spec = resource_spec(name)
    missing = [f for f in spec.files if f not in staged_files]
    if missing:
        raise ModelError(f"Import of {spec.what} produced no {missing[0]}; nothing was installed.")
    target = resource_dir(name, root)
    with staging(root) as work:
        folder = work / spec.name
        folder.mkdir()
        for file_name in spec.files:
            shutil.copyfile(staged_files[file_name], folder / file_name)
        manifest = {
            "resource": spec.name,
            "files": {f: sha256_file(folder / f) for f in spec.files},
            "source": dict(source),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        retired = None
        if target.exists():
            retired = work / f"{STAGING_PREFIX}old-{spec.name}"
            os.replace(target, retired)
        os.replace(folder, target)
    return target


