"""`tsrt models quantize`: calibrate, quantize and gate every fold of the models asked for; install only on a pass.

Nothing is half-written: each int8 graph is written to a temp file beside its fp32 graph and renamed into
place only after every model passed its gate (or with `force`); then each plan gains its `int8` record and
`quantization_report.json` is written, each atomically. A refusal leaves the fp32 graphs, the plans and any
earlier int8 graph exactly as they were. A plan's record names the graph's sha256, so a graph replaced before
its plan is rewritten is refused at load time, never run ungated.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tsrt.errors import ModelError
from tsrt.models.plan import int8_graph_name, load_model_plans, plan_text
from tsrt.models.registry import ModelPart, Task
from tsrt.models.store import model_dir, model_status, sha256_file
from tsrt.pipeline.infer import load_model
from tsrt.pipeline.write import atomic_output, write_json
from tsrt.progress import progress
from tsrt.quantization.calibration import QuantTarget, calibration_tiles, held_out, scans_sha256
from tsrt.quantization.gate import CLASS_DICE, LARGE_CLASS_VOXELS, MEAN_DICE, MEAN_MIN_VOXELS, GateResult, run_gate
from tsrt.quantization.graph import DEFAULT_METHOD, check_engines, qdq_node_counts, write_qdq_graph
from tsrt.version import __version__

log = logging.getLogger("tsrt")

REPORT_FILE = "quantization_report.json"
#: Calibration tiles per model: more tiles from more scans give steadier ranges; at 128^3 each costs
#: ~10 s and ~9 GB while it runs (one at a time).
DEFAULT_MAX_TILES = 32


@dataclass
class Outcome:
    """One model's quantization: what the gate measured, and whether its int8 graphs were installed."""

    target: QuantTarget
    gate: GateResult
    report: dict[str, Any]
    installed: bool = False

    @property
    def report_path(self) -> Path:
        return self.target.model_dir / REPORT_FILE


class GateRefused(ModelError):
    """The gate refused int8 and nothing was installed; `outcomes` hold what it measured (for the table)."""

    def __init__(self, message: str, outcomes: list[Outcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def model_dir_targets(folder: Path) -> list[QuantTarget]:
    """An exported model folder (every fold)."""
    return [QuantTarget(Path(folder), load_model_plans(Path(folder)))]


def task_targets(task: Task, store_root: Path | None = None, *, with_optional: bool = False) -> list[QuantTarget]:
    """Every model a TotalSegmentator task (in its mode) runs, from tsrt's store; each must be installed."""
    models: list[ModelPart] = [*task.required_models, *(task.optional_models if with_optional else ())]
    missing = [model.name for model in models if not model_status(model, store_root).complete]
    if missing:
        mode = {"fast": " --fast", "fastest": " --fastest"}.get(task.mode, "")
        raise ModelError(
            f"Task {task.name}{mode} needs models that are not in the store ({', '.join(missing)}): install them "
            f"first with `tsrt models import {task.name}{mode}` or `tsrt models download {task.name}{mode}`."
        )
    return [
        QuantTarget(model_dir(model, store_root), load_model_plans(model_dir(model, store_root), _folds(model)), model)
        for model in models
    ]


def _folds(model: ModelPart) -> list[str] | None:
    return list(model.fold_names) if model.fold_names else None


def quantize(
    targets: Sequence[QuantTarget],
    calibration: Sequence[Path],
    validation: Sequence[Path] | None = None,
    *,
    method: str = DEFAULT_METHOD,
    force: bool = False,
    max_tiles: int = DEFAULT_MAX_TILES,
    show_progress: bool = True,
    form: str = "cpu",
) -> list[Outcome]:
    """Quantize every fold of every target, gate each model on the validation scans (else a held-out part of
    the calibration scans) and install all of them when all pass, or with `force`. Raises GateRefused
    (a ModelError, nothing installed) otherwise. `form` "tensorrt": the symmetric form TensorRT builds
    (tsrt.quantization.graph), gated the same way."""
    held = not validation
    calibration, validation = held_out(calibration, validation)
    facts = {
        "method": method, "form": form,
        "calibration": {"sha256": scans_sha256(calibration), "scans": [str(Path(s).resolve()) for s in calibration]},
        "validation": {"sha256": scans_sha256(validation), "scans": [str(Path(s).resolve()) for s in validation],
                       "held_out_from_calibration": held},
    }
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as staged:  # each int8 graph: a temp file until the stack closes without error
        for target in targets:
            outcomes.append(_quantize_target(target, calibration, validation, facts, staged, max_tiles, show_progress))
        refused = [outcome for outcome in outcomes if not outcome.gate.passed]
        if refused and not force:
            raise GateRefused(_refusal(refused), outcomes)
    for outcome in outcomes:
        _install(outcome, forced=not outcome.gate.passed)
    return outcomes


def _quantize_target(
    target: QuantTarget, calibration: list[Path], validation: list[Path], facts: dict[str, Any],
    staged: contextlib.ExitStack, max_tiles: int, show_progress: bool,
) -> Outcome:
    log.info("quantizing %s (%d fold(s)) on %d calibration scan(s)", target.name, len(target.plans), len(calibration))
    tiles = calibration_tiles(calibration, target, max_tiles, show_progress=show_progress)
    candidates: list[Path] = []
    with progress(f"calibrating ({target.name})", len(tiles) * len(target.plans), enabled=show_progress,
                  transient=True) as advance:
        for plan in target.plans:
            candidate = staged.enter_context(atomic_output(plan.graph_path.with_name(int8_graph_name(plan))))
            how = write_qdq_graph(plan.graph_path, candidate, tiles, plan.graph_input_name, facts["method"],
                                  on_tile=lambda: advance(1), form=facts["form"])
            candidates.append(candidate)
    engines = check_engines(candidates[0], tiles[0], target.plan.graph_input_name, target.plan.graph_output_name)
    folds = [plan.fold for plan in target.plans]
    fp32 = load_model(target.model_dir, folds=folds, provider="cpu")
    int8 = load_model(target.model_dir, folds=folds, provider="cpu", graphs=candidates)
    gate = run_gate(target, fp32, int8, validation, show_progress=show_progress)
    del fp32, int8  # sessions of large models hold hundreds of MB
    report = {
        "model": target.name, "model_dir": str(target.model_dir.resolve()), "folds": folds,
        "tsrt_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "installed": False, "forced": False,  # until _install
        "thresholds": {"mean_dice": MEAN_DICE, "mean_over_classes_min_voxels": MEAN_MIN_VOXELS,
                       "class_dice": CLASS_DICE, "class_min_voxels": LARGE_CLASS_VOXELS},
        **gate.summary(), "per_class": gate.per_class, "seconds": gate.seconds,
        "quantization": how, "calibration": {**facts["calibration"], "method": facts["method"], "tiles": len(tiles)},
        "validation": facts["validation"],
        "engines": engines, "qdq_nodes": qdq_node_counts(candidates[0]),
        "graphs": {plan.fold: {"file": int8_graph_name(plan), "sha256": sha256_file(path)}
                   for plan, path in zip(target.plans, candidates)},
    }
    return Outcome(target, gate, report)


def _refusal(refused: list[Outcome]) -> str:
    reasons = "; ".join(f"{o.target.name}: {', '.join(o.gate.failures[:2])}" for o in refused)
    return (f"int8 refused by the accuracy gate ({reasons}); nothing was installed, the fp32 graphs and plans are "
            "unchanged: calibrate on more or other scans, or install it anyway with --force.")


def _install(outcome: Outcome, *, forced: bool) -> None:
    """Record the (already renamed) int8 graphs in their plans, then write the report; each file atomically."""
    outcome.report.update(forced=forced, installed=True)
    record_gate = {**outcome.gate.summary(), "forced": forced, "report": REPORT_FILE,
                   "validation_sha256": outcome.report["validation"]["sha256"]}
    calibration = outcome.report["calibration"]
    for plan in outcome.target.plans:
        assert plan.path is not None
        graph = outcome.report["graphs"][plan.fold]
        record = {
            "graph_file": graph["file"], "graph_sha256": graph["sha256"], "precision": "int8",
            "quantization": outcome.report["quantization"], "calibration": {**calibration, "scans": len(calibration["scans"])},
            "gate": record_gate, "tsrt_version": __version__, "created": outcome.report["created"],
        }
        document = json.loads(plan.path.read_text())
        document["int8"] = record
        with atomic_output(plan.path) as temp:
            temp.write_text(plan_text(document))  # RecordedPlan.save's format
    outcome.installed = True
    write_json(outcome.report, outcome.report_path)
