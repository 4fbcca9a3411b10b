"""The run manifest beside single-image outputs (tsrt.outputs.manifest), read back from the files a real run writes.

A task on a NIfTI file into a mask folder (tsrt_manifest.json inside it, `--json` on stdout equal to it),
a task on TotalSegmentator's DICOM test series (its digest over file names and contents), and an
exported model (`--model`, as a user runs the command: `--json` parses and equals the file beside it).
The expected values are computed here independently: hashes of the bytes, the stored plans' checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tsrt.cli.root import app, totalsegmentator_argv
from tsrt.models.plan import read_plan
from tsrt.outputs.manifest import FOLDER_MANIFEST, manifest_path
from tsrt.version import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "tsrt" / "demo" / "model"
FASTEST = "Dataset298_TotalSegmentator_total_6mm_1559subj"


def _cli(store: Path, *args: str):
    result = CliRunner().invoke(app, totalsegmentator_argv(list(args)), env={"TSRT_HOME": str(store)})
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def _stored_graph(store: Path, model: str) -> str:
    return read_plan(store / "models" / model / "fold_0.plan.json").graph_sha256


def test_manifest_names_stay_out_of_the_mask_globs(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    assert manifest_path(tmp_path / "masks") == tmp_path / "masks" / FOLDER_MANIFEST
    assert manifest_path(tmp_path / "seg.nii.gz") == tmp_path / "seg.tsrt.json"
    assert manifest_path(tmp_path / "seg.nii") == manifest_path(tmp_path / "seg") == tmp_path / "seg.tsrt.json"
    assert manifest_path(tmp_path / "ct.v2.nii.gz") == tmp_path / "ct.v2.tsrt.json"
    assert manifest_path(tmp_path / "seg.dcm") == tmp_path / "seg.tsrt.json"
    assert manifest_path(tmp_path / "case", folder=True) == tmp_path / "case" / FOLDER_MANIFEST


def test_task_on_nifti_into_a_mask_folder_and_json_on_stdout(
    small_task_store: Path, shared_data: Path, tmp_path: Path
) -> None:
    ct, out = shared_data / "example_ct_sm.nii.gz", tmp_path / "masks"
    result = _cli(small_task_store, "-i", str(ct), "-o", str(out), "--fastest", "-d", "cpu", "-q", "--json",
                  "--statistics")
    written = json.loads((out / FOLDER_MANIFEST).read_text())
    assert json.loads(result.stdout) == written
    masks = sorted(path.name for path in out.glob("*.nii.gz"))
    assert len(masks) > 100 and FOLDER_MANIFEST not in masks  # the task's classes; the manifest is not a mask
    assert written["outputs"] == sorted([*masks, "statistics.json"])
    request = written["request"]
    assert (request["kind"], request["name"], request["tsrt_version"], request["model_dir"]) == (
        "task", "total", __version__, None
    )
    assert request["options"]["fastest"] is True and request["options"]["statistics"] is True
    assert request["options"]["ml"] is False and "provider" not in request["options"]  # where it ran is not an option
    assert [(g["model"], g["fold"], g["sha256"]) for g in request["graphs"]] == [
        (FASTEST, "0", _stored_graph(small_task_store, FASTEST))
    ]
    plan = small_task_store / "models" / FASTEST / "fold_0.plan.json"
    assert request["graphs"][0]["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert written["input"] == {
        "path": str(ct.resolve()), "kind": "nifti", "sha256": hashlib.sha256(ct.read_bytes()).hexdigest(),
        "shape": [122, 101, 30], "spacing": [3.0, 3.0, 3.0],
    }
    assert (written["provider"], written["precision"]) == ("cpu", "fp32")
    assert written["peak_memory_mb"] > 0 and 0 < written["seconds"] < 600


def _folder_digest(folder: Path) -> str:
    """The DICOM folder's digest as the manifest documents it: each file's relative name, a NUL, its sha256."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_task_on_a_dicom_folder(small_task_store: Path, shared_data: Path, tmp_path: Path) -> None:
    series = shared_data / "example_ct_dicom"
    _cli(small_task_store, "-i", str(series), "-o", str(tmp_path / "seg.nii.gz"), "--fastest", "--ml", "-d", "cpu",
         "-q")
    written = json.loads((tmp_path / "seg.tsrt.json").read_text())
    assert written["outputs"] == ["seg.nii.gz"]
    assert written["input"]["kind"] == "dicom_folder" and written["input"]["path"] == str(series.resolve())
    assert written["input"]["sha256"] == _folder_digest(series)
    import nibabel as nib

    label_file = nib.load(tmp_path / "seg.nii.gz")
    assert written["input"]["shape"] == list(label_file.shape)
    assert written["input"]["spacing"] == pytest.approx([float(z) for z in label_file.header.get_zooms()])


def test_model_run_json_equals_the_manifest_beside_the_label_file(shared_data: Path, tmp_path: Path) -> None:
    ct, output = shared_data / "example_ct_sm.nii.gz", tmp_path / "seg.nii.gz"
    run = subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", "segment", str(ct), "-o", str(output),
         "--model", str(DEMO_MODEL), "--provider", "cpu", "--json", "--save-probabilities"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUTF8": "1"},
    )
    assert run.returncode == 0, run.stderr
    written = json.loads((tmp_path / "seg.tsrt.json").read_text())
    assert json.loads(run.stdout) == written
    assert written["outputs"] == ["seg.nii.gz", "seg.npz", "seg.pkl"]
    request = written["request"]
    assert (request["kind"], request["name"]) == (
        "model", "Dataset900_TsrtDemo/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    )
    assert request["model_dir"] == str(DEMO_MODEL.resolve())
    assert request["options"] == {
        "folds": ["0"], "tta": True, "step_size": 0.5, "batch_size": 1, "save_probabilities": True, "precision": "fp32",
    }
    graph = DEMO_MODEL / "fold_0.onnx"
    assert [g["sha256"] for g in request["graphs"]] == [hashlib.sha256(graph.read_bytes()).hexdigest()]
    assert written["input"]["sha256"] == hashlib.sha256(ct.read_bytes()).hexdigest()
    assert (written["provider"], written["precision"]) == ("cpu", "fp32")


def test_a_rerun_on_another_precision_is_a_changed_request(monkeypatch) -> None:
    """bf16 changes voxels, so its results never match an fp32 request (and vice versa); the old
    openvino-bf16 spelling is the same request as --provider openvino --precision bf16."""
    import tsrt.engines.providers as providers
    from tsrt.outputs.manifest import RunRequest
    from tsrt.totalseg.options import SegmentOptions

    monkeypatch.setattr(providers, "native_bf16", lambda: True)  # the request, not this CPU, is under test
    fp32, bf16 = SegmentOptions(provider="openvino"), SegmentOptions(provider="openvino", precision="bf16")
    assert SegmentOptions(provider="openvino-bf16").written_options() == bf16.written_options()
    assert fp32.written_options() == SegmentOptions(provider="cpu").written_options()  # the engine alone: same
    earlier = RunRequest("task", "total", fp32.written_options(), ())
    assert earlier.differences(RunRequest("task", "total", bf16.written_options(), ())) == [
        'precision: "fp32" -> "bf16"'
    ]
