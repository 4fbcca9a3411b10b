"""The model store: exported TotalSegmentator models under $TSRT_HOME/models.

Layout (one folder per nnU-Net dataset, named like TotalSegmentator's release folder)::

    $TSRT_HOME/models/
        Dataset297_TotalSegmentator_total_3mm_1559subj/
            fold_0.onnx  fold_0.plan.json  fold_0.verify.json   (as tsrt.models.exporter writes them)
            .verified.json       graph size/mtime/sha256 recorded at install, so status checks
                                 need not re-hash gigabytes each time (--verify re-hashes)
        .staging-XXXX/           work folders of running imports (never read as models)

A model is *complete* when every fold the registry requires has its graph and plan, the plan was
exported from the expected Trainer__Plans__Configuration folder, and the graph's sha256 matches the plan.
Models only enter the store by `install`, which renames a fully written folder into place, so a
crash leaves either the old model or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from tsrt.errors import ModelError, TsrtError
from tsrt.models.plan import PLAN_SUFFIX, RecordedPlan, read_plan, require_int8
from tsrt.config import tsrt_home
from tsrt.models.registry import ModelPart

VERIFIED_FILE = ".verified.json"
STAGING_PREFIX = ".staging-"
State = Literal["complete", "incomplete", "missing"]


@dataclass(frozen=True)
class ModelStatus:
    model: ModelPart
    path: Path
    state: State
    problems: tuple[str, ...]  # why an incomplete model is incomplete
    folds: tuple[str, ...]  # exported folds found
    size_bytes: int

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def models_root(root: Path | None = None) -> Path:
    """Where exported models live: `root`, else $TSRT_HOME/models."""
    return Path(root) if root is not None else tsrt_home() / "models"


def model_dir(model: ModelPart, root: Path | None = None) -> Path:
    return models_root(root) / model.name


def model_status(model: ModelPart, root: Path | None = None, *, verify: bool = False) -> ModelStatus:
    """Whether `model` is complete in the store; `verify` re-hashes graphs even when the record is current."""
    path = model_dir(model, root)
    if not path.is_dir():
        return ModelStatus(model, path, "missing", (), (), 0)
    exported = _exported_folds(path)
    required = model.fold_names if model.fold_names is not None else exported
    problems: list[str] = []
    if not required:
        problems.append("no exported folds")
    verified = _read_verified(path)
    for fold in required:
        problems.extend(_fold_problems(model, path, fold, verified, verify))
    return ModelStatus(
        model=model,
        path=path,
        state="incomplete" if problems else "complete",
        problems=tuple(problems),
        folds=exported,
        size_bytes=directory_size(path),
    )


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(size: int) -> str:
    """Bytes as people read them (KB/MB/GB, 1024-based), the same in `tsrt models` and the UI."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _exported_folds(path: Path) -> tuple[str, ...]:
    names = [p.name[: -len(PLAN_SUFFIX)].removeprefix("fold_") for p in path.glob(f"fold_*{PLAN_SUFFIX}")]
    return tuple(sorted(names, key=lambda f: (0, int(f), "") if f.isdigit() else (1, 0, f)))


def _fold_problems(model: ModelPart, path: Path, fold: str, verified: dict, verify: bool) -> list[str]:
    plan_path = path / f"fold_{fold}{PLAN_SUFFIX}"
    if not plan_path.is_file():
        return [f"fold {fold} has no plan"]
    try:
        plan = read_plan(plan_path)
    except ModelError as err:
        return [f"fold {fold}: {err}"]
    # The plan names the checkpoint it was exported from as Trainer__Plans__Configuration/fold_N/...
    source_folder = plan.checkpoint_file.split("/", 1)[0]
    expected_folder = model.result_folder.rsplit("/", 1)[-1]
    if source_folder != expected_folder:
        return [f"fold {fold} was exported from {source_folder}, not {expected_folder}"]
    graph = plan.graph_path
    if not graph.is_file():
        return [f"fold {fold} has no graph {graph.name}"]
    if _graph_sha256(graph, verified, verify) != plan.graph_sha256:
        return [f"fold {fold}: {graph.name} does not match the sha256 in its plan"]
    return []


def _graph_sha256(graph: Path, verified: dict, verify: bool) -> str:
    """The graph's sha256, from the install-time record when its size and mtime are unchanged."""
    record = verified.get(graph.name)
    stat = graph.stat()
    if not verify and record and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return str(record.get("sha256"))
    return sha256_file(graph)


def recorded_graph_sha256(graph: Path) -> str:
    """A graph's sha256 from its folder's install-time record while its size and mtime are unchanged, else
    hashed: opening a model keys its caches without reading a 100+ MB graph that the store has checked."""
    return _graph_sha256(Path(graph), _read_verified(Path(graph).parent), verify=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gated_int8_graphs(model_dir: Path, plans: list[RecordedPlan]) -> list[Path]:
    """The gated int8 graph of each fold, each only while its bytes are the ones its plan recorded at the gate;
    else one line naming the `tsrt models quantize` call that makes them (`--precision int8` runs and
    `tsrt engine build --precision int8` read no other int8 graph)."""
    require_int8(plans, f"the model in {model_dir}", str(model_dir))
    graphs = []
    for plan in plans:
        graph = plan.int8_graph_path
        assert graph is not None and plan.int8 is not None  # require_int8
        if not graph.exists() or sha256_file(graph) != plan.int8.get("graph_sha256"):
            raise ModelError(
                f"The int8 graph {graph} is missing or not the one its plan's gate passed: run "
                f"`tsrt models quantize {graph.parent} --calibration SCANS` again."
            )
        graphs.append(graph)
    return graphs


def _read_verified(path: Path) -> dict:
    try:
        data = json.loads((path / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verified(path: Path) -> None:
    """Record each graph's size, mtime and (plan-checked) sha256 for fast later status checks."""
    records = {}
    for fold in _exported_folds(path):
        plan = read_plan(path / f"fold_{fold}{PLAN_SUFFIX}")
        stat = plan.graph_path.stat()
        records[plan.graph_file] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": plan.graph_sha256}
    temporary = path / f"{VERIFIED_FILE}.tmp"
    temporary.write_text(json.dumps(records, indent=2, sort_keys=True))
    os.replace(temporary, path / VERIFIED_FILE)


@contextlib.contextmanager
def staging(root: Path | None = None) -> Iterator[Path]:
    """A scratch folder inside the store (same file system, so `install` is a rename); removed afterwards."""
    base = models_root(root)
    try:
        base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=base))
    except OSError as err:
        raise TsrtError(
            f"Cannot write to the model store {base} ({err.strerror}): set TSRT_HOME to a writable folder."
        ) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def install(staged: Path, model: ModelPart, root: Path | None = None) -> ModelStatus:
    """Move a fully exported folder into the store as `model`, replacing an incomplete copy.

    The staged folder is checked like a stored model first (hashing every graph), so only complete
    models ever get the store's name. `staged` must be on the store's file system (see `staging`).
    """
    staged = Path(staged)
    check = _check_folder(staged, model)
    if check:
        raise ModelError(
            f"The export of {model.name} is incomplete ({check[0]}); nothing was installed: run the import again."
        )
    target = model_dir(model, root)
    retired = None
    if target.exists():
        retired = target.with_name(f"{STAGING_PREFIX}old-{target.name}-{os.getpid()}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
    os.replace(staged, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    _write_verified(target)
    return model_status(model, root)


def _check_folder(folder: Path, model: ModelPart) -> list[str]:
    exported = _exported_folds(folder)
    required = model.fold_names if model.fold_names is not None else exported
    if not required:
        return ["no exported folds"]
    problems: list[str] = []
    for fold in required:
        problems.extend(_fold_problems(model, folder, fold, {}, True))
    return problems
