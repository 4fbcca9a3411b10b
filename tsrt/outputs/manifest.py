"""The run manifest: what made a result, written beside it, atomically and last.

Every result (`tsrt segment` with a task or `--model`, each cohort case here or on Ray, the web page's
download) gets one JSON file saying what produced it: tsrt's version, the task or model with every
option that changes what is written, each graph's and recorded plan's sha256, the provider and
precision the sessions actually ran on, the input's sha256 (a DICOM folder: over its sorted file names
and contents), shape and spacing, start and end time and the peak memory.

Where it goes, so that nothing TotalSegmentator users glob for (`*.nii.gz`, `*.dcm`) ever counts it:
a folder output (per-class masks) holds `tsrt_manifest.json`; a file output (`-o seg.nii.gz`, `--ml`,
`--model`, DICOM files) gets `seg.tsrt.json` beside it. Being written last, it also marks a complete
output: a cohort rerun skips a case only when its manifest matches the new request (`check_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tsrt.models.plan import RecordedPlan, load_model_plans, plan_text
from tsrt.models.store import sha256_file
from tsrt.pipeline.read import Image
from tsrt.pipeline.write import write_json
from tsrt.version import __version__

#: Bumped when a field changes meaning; a manifest of another format never matches (the case is redone).
MANIFEST_FORMAT = 1
#: The manifest inside a folder output.
FOLDER_MANIFEST = "tsrt_manifest.json"
#: The ending of the manifest beside a file output (seg.nii.gz -> seg.tsrt.json).
FILE_MANIFEST_SUFFIX = ".tsrt.json"
#: Endings stripped from a file output's name to name its manifest.
_OUTPUT_ENDINGS = (".nii.gz", ".nii", ".dcm")

#: Manifest states of an earlier result against a new request.
MATCHED, CHANGED, MISSING = "matched", "changed", "missing"


def manifest_path(output: Path, *, folder: bool | None = None) -> Path:
    """Where the manifest of `output` goes: inside it when it is a folder, else beside it as NAME.tsrt.json.

    `folder` None asks the file system (call it after writing: a mask folder exists by then).
    """
    output = Path(output)
    if output.is_dir() if folder is None else folder:
        return output / FOLDER_MANIFEST
    name = output.name
    for ending in _OUTPUT_ENDINGS:
        if name.lower().endswith(ending) and len(name) > len(ending):
            name = name[: -len(ending)]
            break
    return output.with_name(name + FILE_MANIFEST_SUFFIX)


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class GraphRecord:
    """One graph a request runs: its model, fold and the sha256 of the graph and of its recorded plan."""

    model: str  # the store's model folder (tasks) or the model's name (--model: RunRequest.name)
    fold: str
    sha256: str  # the ONNX graph, as its plan records it (checked against the file at install and export)
    plan_sha256: str  # the recorded plan (preprocessing, labels): a re-export changes it

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a rerun compares: the content, not where the model was stored."""
        return (self.fold, self.sha256, self.plan_sha256)


def plan_graph_records(model: str, plans: Iterable[RecordedPlan], precision: str = "fp32") -> tuple[GraphRecord, ...]:
    """The graphs a run at `precision` uses, from loaded plans (each plan read from a file).

    int8 runs the gated int8 graph: its sha256 and the whole plan's, int8 record included, so quantizing again
    (another graph, calibration or gate) redoes int8 results. Any other precision runs the exported graph: the
    plan's sha256 without the int8 record, so installing or replacing int8 leaves those results matched.
    """
    records = []
    for plan in plans:
        if plan.path is None:
            records.append(GraphRecord(model, plan.fold, plan.graph_sha256, ""))
        elif precision == "int8" and plan.int8 is not None:
            records.append(GraphRecord(model, plan.fold, str(plan.int8["graph_sha256"]), sha256_file(plan.path)))
        else:
            records.append(GraphRecord(model, plan.fold, plan.graph_sha256, exported_plan_sha256(plan.path)))
    return tuple(records)


def exported_plan_sha256(path: Path) -> str:
    """sha256 of a plan as exported: of the file, or when `tsrt models quantize` added an int8 record, of the
    file's text without it (the bytes the file had before; quantizing adds nothing else)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if "int8" not in document:
        return sha256_file(path)
    del document["int8"]
    return hashlib.sha256(plan_text(document).encode("utf-8")).hexdigest()


def graph_records(
    model: str, model_dir: Path, folds: Sequence[str] | None = None, precision: str = "fp32"
) -> tuple[GraphRecord, ...]:
    """The graphs of an exported model folder's folds (all exported folds when None) at `precision`, from their plans."""
    return plan_graph_records(model, load_model_plans(Path(model_dir), list(folds) if folds else None), precision)


def _json_ready(value: Any) -> Any:
    """Tuples as lists, paths as text: the form a manifest has after a round trip through JSON."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class RunRequest:
    """What decides the written files: the same request on the same input bytes writes the same files.

    `options` are the options that change what is written (for tasks every SegmentOptions field but
    where and how fast the models run; for --model folds, tta, step size, batch size, probabilities).
    """

    kind: str  # "task" or "model"
    name: str  # the task (total, ...), or the model as nnU-Net names its result (Dataset/Trainer__Plans__Config)
    options: dict[str, Any]
    graphs: tuple[GraphRecord, ...]
    model_dir: str | None = None  # --model: where the folder was (its graphs' sha256 identify it)
    tsrt_version: str = __version__

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _json_ready(dict(self.options)))
        object.__setattr__(self, "graphs", tuple(self.graphs))

    def with_options(self, **options: Any) -> RunRequest:
        """The same request with more options (the web page's structure choice)."""
        return replace(self, options={**self.options, **options})

    def differences(self, new: RunRequest) -> list[str]:
        """What changed from this (earlier) request to `new`, in words; empty when they write the same."""
        changes = []
        if self.tsrt_version != new.tsrt_version:
            changes.append(f"tsrt {self.tsrt_version} -> {new.tsrt_version}")
        if self.kind != new.kind:
            changes.append(f"made by a {self.kind} ({self.name}), now a {new.kind} ({new.name})")
        elif self.name != new.name:
            changes.append(f"{self.kind} {self.name} -> {new.name}")
        for key in sorted(set(self.options) | set(new.options)):
            old, now = self.options.get(key), new.options.get(key)
            if old != now:
                changes.append(f"{key}: {json.dumps(old)} -> {json.dumps(now)}")
        if sorted(g.identity for g in self.graphs) != sorted(g.identity for g in new.graphs):
            changes.append("other model graphs (re-exported, re-imported, re-quantized or replaced)")
        return changes

    def to_json(self) -> dict[str, Any]:
        return {
            "tsrt_version": self.tsrt_version, "kind": self.kind, "name": self.name, "model_dir": self.model_dir,
            "options": self.options, "graphs": [asdict(graph) for graph in self.graphs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRequest:
        return cls(
            kind=str(data["kind"]), name=str(data["name"]), options=dict(data["options"]),
            graphs=tuple(GraphRecord(**graph) for graph in data["graphs"]), model_dir=data.get("model_dir"),
            tsrt_version=str(data["tsrt_version"]),
        )


@dataclass(frozen=True)
class InputRecord:
    """The input as read: where, its bytes' sha256, and the voxel grid the models saw."""

    path: str
    kind: str  # nifti, dicom_folder, dicom_zip, or image (handed over in memory)
    sha256: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @classmethod
    def of(cls, path: Path | None, image: Image, sha256: str | None = None) -> InputRecord:
        """The record of `image` read from `path` (None: an in-memory image, hashed by its voxels and affine)."""
        if path is None:
            digest = hashlib.sha256(image.array.tobytes())
            digest.update(image.affine.tobytes())
            kind, shown, sha256 = "image", image.source, sha256 or digest.hexdigest()
        else:
            path = Path(path)
            kind = "dicom_folder" if path.is_dir() else "dicom_zip" if path.name.lower().endswith(".zip") else "nifti"
            shown, sha256 = str(path.resolve()), sha256 or input_sha256(path)
        return cls(shown, kind, sha256, tuple(image.spatial_shape), tuple(float(s) for s in image.spacing))


def input_sha256(path: Path) -> str:
    """sha256 of an input file; of a DICOM folder, over its files' relative names and contents in sorted order."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    files = sorted(
        (Path(root, name).relative_to(path).as_posix(), Path(root, name))
        for root, _, names in os.walk(path) for name in names
    )
    for relative, file in files:
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


@dataclass(frozen=True)
class RunFacts:
    """What only the run itself knows: the image it read and what its sessions actually ran on."""

    image: Image
    provider: str
    precision: str


@dataclass(frozen=True)
class RunManifest:
    """One result's manifest (see the module docstring); `outputs` are relative to the manifest's folder."""

    request: RunRequest
    input: InputRecord
    provider: str
    precision: str
    started: str  # ISO 8601, UTC
    finished: str
    seconds: float
    peak_memory_mb: float | None
    outputs: tuple[str, ...] = ()
    format: int = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "request": self.request.to_json(), "input": _json_ready(asdict(self.input)),
            "provider": self.provider, "precision": self.precision, "started": self.started,
            "finished": self.finished, "seconds": round(self.seconds, 3),
            "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 1),
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunManifest:
        record = data["input"]
        return cls(
            request=RunRequest.from_json(data["request"]),
            input=InputRecord(str(record["path"]), str(record["kind"]), str(record["sha256"]),
                              tuple(record["shape"]), tuple(record["spacing"])),
            provider=str(data["provider"]), precision=str(data["precision"]), started=str(data["started"]),
            finished=str(data["finished"]), seconds=float(data["seconds"]), peak_memory_mb=data["peak_memory_mb"],
            outputs=tuple(data["outputs"]), format=int(data["format"]),
        )

    def write(self, path: Path) -> Path:
        """Atomically, so a half-written manifest never marks a result complete."""
        return write_json(self.to_json(), Path(path))


def read_manifest(path: Path) -> RunManifest:
    """The manifest at `path`; ValueError (with why) when it is missing, unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("no run manifest") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable run manifest ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError("run manifest of another format")
    try:
        return RunManifest.from_json(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"incomplete run manifest (no {error})") from None


# --------------------------------------------------------------------------------------------- recording a run


def now() -> str:
    """UTC with milliseconds: two runs of one case never share a start time (a rewritten manifest shows)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def reset_peak_memory() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) so the next reading is this run's peak (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float | None:
    """The process's peak resident memory since the last reset, in MB (None where /proc is not there)."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM"))
    except (OSError, StopIteration, ValueError):
        return None


class RunRecorder:
    """Times one run for its manifest; the peak-memory counter restarts when it starts (`restart_memory`)."""

    def __init__(self, *, restart_memory: bool = True) -> None:
        self.started = now()
        self._clock = time.perf_counter()
        if restart_memory:
            reset_peak_memory()

    def manifest(
        self, request: RunRequest, source: InputRecord, facts: RunFacts, outputs: Iterable[Path], folder: Path
    ) -> RunManifest:
        """The manifest of the finished run; `outputs` are named relative to `folder` (the manifest's)."""
        names = sorted({Path(os.path.relpath(path, folder)).as_posix() for path in outputs})
        return RunManifest(
            request=request, input=source, provider=facts.provider, precision=facts.precision, started=self.started,
            finished=now(), seconds=time.perf_counter() - self._clock, peak_memory_mb=peak_memory_mb(),
            outputs=tuple(names),
        )

    def write(
        self, path: Path, request: RunRequest, source: InputRecord, facts: RunFacts, outputs: Iterable[Path]
    ) -> RunManifest:
        """Build the manifest and write it to `path`, last, once every output is in place."""
        manifest = self.manifest(request, source, facts, outputs, Path(path).parent)
        manifest.write(path)
        return manifest


# --------------------------------------------------------------------------------------------- reruns


@dataclass(frozen=True)
class ManifestCheck:
    """An earlier result against a new request: matched (keep it), changed or missing (redo it), and why."""

    state: str  # MATCHED, CHANGED or MISSING
    reason: str = ""


def check_manifest(path: Path, request: RunRequest, input_path: Path, expected: Iterable[Path] = ()) -> ManifestCheck:
    """Whether the result whose manifest is at `path` is what `request` would write from `input_path` now.

    Matched needs the same request (tsrt version, task or model, options, graphs), every output the
    manifest lists (and each `expected` file) in place, and the same input bytes (hashed last: the
    most expensive check).
    """
    try:
        manifest = read_manifest(path)
    except ValueError as error:
        return ManifestCheck(MISSING, str(error))
    changes = manifest.request.differences(request)
    if changes:
        return ManifestCheck(CHANGED, "; ".join(changes))
    folder = Path(path).parent
    missing = [name for name in manifest.outputs if not (folder / name).exists()]
    missing += [Path(file).name for file in expected if not Path(file).exists()]
    if missing:
        return ManifestCheck(CHANGED, f"{missing[0]} is missing")
    try:
        same_input = input_sha256(input_path) == manifest.input.sha256
    except OSError:
        return ManifestCheck(CHANGED, f"the input {input_path} cannot be read")
    return ManifestCheck(MATCHED) if same_input else ManifestCheck(CHANGED, "the input's bytes changed")
