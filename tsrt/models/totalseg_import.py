"""Import TotalSegmentator's downloaded models into tsrt's store (ONNX graphs + recorded plans), without torch.

TotalSegmentator keeps its weights as nnU-Net result folders under
`$TOTALSEG_HOME_DIR/nnunet/results/DatasetNNN_name/Trainer__Plans__Configuration/` (its release zips
unpack to exactly that). This module finds the folders a task needs, checks they are complete
*before* exporting anything, and exports each missing model through a staging folder inside the
store, which `tsrt.models.store.install` renames into place.

The export is torch-free by default (tsrt.models.exporter: restricted checkpoint reader, graph
builder), so `tsrt models import` and `tsrt models download` work in a runtime-only install. An
`exporter` with the same signature can be passed instead; tsrt_export.import_totalseg passes the
torch exporter, which verifies every graph against the torch network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

from tsrt.config import default_totalseg_home
from tsrt.errors import ModelError
from tsrt.models import store
from tsrt.models.checkpoint import CHECKPOINT_NAME
from tsrt.models.exporter import export_result_folder
from tsrt.models.registry import ModelPart, Task

Action = Literal["imported", "present", "absent"]


class Exporter(Protocol):
    """Exports a result folder's folds into OUT_DIR (nothing there unless all succeed); returns the plan paths."""

    def __call__(
        self, model_folder: Path, out_dir: Path, *, folds: Sequence[str | int] | None = None, progress: bool = True
    ) -> list[Path]: ...


@dataclass(frozen=True)
class ImportOutcome:
    model: ModelPart
    action: Action  # imported now, already complete in the store, or (optional model) not in the source
    path: Path


def results_root(totalseg_home: Path) -> Path:
    """Where TotalSegmentator keeps nnU-Net result folders inside its home."""
    return Path(totalseg_home) / "nnunet" / "results"


def locate(model: ModelPart, results: Path) -> Path | None:
    """The model's complete result folder under `results`, None when the model is not there at all.

    A model that is only partly there (a dataset folder without the expected result folder, plans
    without a fold's checkpoint) raises: exporting it would silently drop folds or fail midway.
    """
    results = Path(results)
    dataset_folder = results / model.name
    folder = results / model.result_folder
    if not dataset_folder.exists():
        return None
    redownload = f"delete {dataset_folder} and download it again"
    if not folder.is_dir():
        found = sorted(p.name for p in dataset_folder.iterdir() if p.is_dir()) or ["nothing"]
        raise ModelError(f"{dataset_folder} holds {', '.join(found)} but not {folder.name}: {redownload}.")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} has no {name}, so {model.name} is only partly downloaded: {redownload}.")
    if model.fold_names is not None:
        missing = [f for f in model.fold_names if not (folder / f"fold_{f}" / CHECKPOINT_NAME).is_file()]
    else:
        numbered = [p for p in folder.glob("fold_*") if p.name.removeprefix("fold_").isdigit()]
        missing = [p.name.removeprefix("fold_") for p in numbered if not (p / CHECKPOINT_NAME).is_file()]
        if not numbered:
            missing = ["0"]
    if missing:
        raise ModelError(
            f"{folder} has no fold_{missing[0]}/{CHECKPOINT_NAME}, so {model.name} is only partly downloaded: "
            f"{redownload}."
        )
    return folder


def import_models(
    models: Sequence[ModelPart],
    results: Path,
    *,
    optional: Iterable[ModelPart] = (),
    store_root: Path | None = None,
    progress: bool = True,
    exporter: Exporter = export_result_folder,
) -> list[ImportOutcome]:
    """Export `models` (all needed) and `optional` (imported when present) from `results` into the store.

    Complete models in the store are skipped, so running it twice does nothing the second time.
    Every source folder is checked before the first export starts.
    """
    results = Path(results)
    wanted = [(model, True) for model in models] + [(model, False) for model in optional]
    plan: list[tuple[ModelPart, Path]] = []
    outcomes: list[ImportOutcome] = []
    for model, needed in wanted:
        status = store.model_status(model, store_root)
        if status.complete:
            outcomes.append(ImportOutcome(model, "present", status.path))
            continue
        folder = locate(model, results)
        if folder is None:
            if needed:
                raise ModelError(
                    f"{results} has no {model.name}: download it with `tsrt models download`, or pass the "
                    "TotalSegmentator home that holds it as --totalseg-home."
                )
            outcomes.append(ImportOutcome(model, "absent", status.path))
            continue
        plan.append((model, folder))
    for model, folder in plan:
        installed = export_into_store(model, folder, store_root, progress, exporter=exporter)
        outcomes.append(ImportOutcome(model, "imported", installed))
    order = {model.name: index for index, (model, _) in enumerate(wanted)}
    return sorted(outcomes, key=lambda outcome: order[outcome.model.name])


def export_into_store(
    model: ModelPart,
    folder: Path,
    store_root: Path | None = None,
    progress: bool = True,
    *,
    exporter: Exporter = export_result_folder,
) -> Path:
    """Export one result folder and install it in the store; return the installed folder."""
    with store.staging(store_root) as staging:
        staged = staging / model.name
        exporter(folder, staged, folds=None if model.folds is None else list(model.folds), progress=progress)
        return store.install(staged, model, store_root).path


def import_task(
    task: Task,
    totalseg_home: Path | None = None,
    *,
    with_optional: bool = False,
    store_root: Path | None = None,
    progress: bool = True,
    exporter: Exporter = export_result_folder,
) -> list[ImportOutcome]:
    """Import every model `task` (in its mode) runs, and optionally the models of its options."""
    home = Path(totalseg_home) if totalseg_home is not None else default_totalseg_home()
    results = results_root(home)
    if not results.is_dir():
        raise ModelError(
            f"{home} is not a TotalSegmentator home (it has no nnunet/results): pass the folder that "
            "TotalSegmentator downloads into (TOTALSEG_HOME_DIR, default ~/.totalsegmentator)."
        )
    optional = task.optional_models if with_optional else ()
    return import_models(
        task.required_models, results, optional=optional, store_root=store_root, progress=progress, exporter=exporter
    )
