"""Cohort reruns decide by the run manifest: a case is skipped only when its manifest matches the new request.

One two-case cohort (TotalSegmentator's example_ct_sm, twice) is run again and again through `tsrt segment`
with real (small fixture) models: the same request skips both cases; another mode (--fast), --roi_subset,
task, an exported model (--model), changed input bytes or an older tsrt redo a case; an interrupted case
(outputs without a manifest, or only a staging folder) is redone; --no-overwrite-changed keeps changed
cases as "stale". Each outcome is read from the files: the masks' and manifests' bytes and the manifests'
fields, never from timestamps alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tsrt.cli.root import app, totalsegmentator_argv
from tsrt.models.plan import read_plan
from tsrt.version import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "tsrt" / "demo" / "model"
CASES = ("a", "b")


def _segment(store: Path, cases: Path, out: Path, *args: str) -> dict:
    """`tsrt segment CASES -o OUT ARGS -q -d cpu` in this process; returns cohort_summary.json."""
    argv = ["segment", str(cases), "-o", str(out), *args, "-q", "-d", "cpu"]
    result = CliRunner().invoke(app, totalsegmentator_argv(argv), env={"TSRT_HOME": str(store)})
    assert result.exit_code == 0, (argv, result.output, result.exception)
    return json.loads((out / "cohort_summary.json").read_text())


def _state(summary: dict) -> dict[str, tuple[str, str]]:
    """case -> (status, manifest state before the run)."""
    return {case["name"]: (case["status"], case["manifest"]) for case in summary["cases"]}


def _files(out: Path) -> dict[str, bytes]:
    """Every file of every case folder (and leftovers beside them), by path: what a rerun may or may not touch."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*")) if path.is_file() and path.name != "cohort_summary.json"
    }


def _manifest(out: Path, case: str) -> dict:
    return json.loads((out / case / f"{case}.tsrt.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _graphs(store: Path, *models: str) -> list[tuple[str, str]]:
    """(model, graph sha256) of fold 0 of each stored model, read from its plan."""
    return sorted((model, read_plan(store / "models" / model / "fold_0.plan.json").graph_sha256) for model in models)


def _manifest_graphs(manifest: dict) -> list[tuple[str, str]]:
    return sorted((graph["model"], graph["sha256"]) for graph in manifest["request"]["graphs"])


@pytest.fixture()
def cohort(shared_data: Path, tmp_path: Path) -> Path:
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in CASES:
        shutil.copy(shared_data / "example_ct_sm.nii.gz", cases / f"{name}.nii.gz")
    return cases


def test_reruns_skip_only_cases_whose_manifest_matches(small_task_store: Path, cohort: Path, tmp_path: Path) -> None:
    store, out = small_task_store, tmp_path / "out"
    fastest, fast = "Dataset298_TotalSegmentator_total_6mm_1559subj", "Dataset297_TotalSegmentator_total_3mm_1559subj"

    # First run: both segmented; the manifest says what made each case, the summary records the request once.
    first = _segment(store, cohort, out, "--fastest", "--ml")
    assert _state(first) == {"a": ("done", "missing"), "b": ("done", "missing")}
    manifest = _manifest(out, "a")
    assert first["request"] == manifest["request"]
    assert (manifest["request"]["kind"], manifest["request"]["name"], manifest["request"]["tsrt_version"]) == (
        "task", "total", __version__
    )
    assert manifest["request"]["options"]["fastest"] is True and manifest["request"]["options"]["fast"] is False
    assert _manifest_graphs(manifest) == _graphs(store, fastest)
    assert manifest["input"]["sha256"] == _sha256(cohort / "a.nii.gz") and manifest["input"]["kind"] == "nifti"
    assert (manifest["input"]["shape"], manifest["input"]["spacing"]) == ([122, 101, 30], [3.0, 3.0, 3.0])
    assert (manifest["provider"], manifest["precision"], manifest["outputs"]) == ("cpu", "fp32", ["a.nii.gz"])
    assert manifest["peak_memory_mb"] > 0 and manifest["started"] <= manifest["finished"]
    by_name = {case["name"]: case for case in first["cases"]}
    assert manifest["peak_memory_mb"] == pytest.approx(by_name["a"]["peak_memory_mb"], abs=0.1)
    assert not list(out.rglob("*.tsrt.json.*")) and not list(out.glob(".tsrt-partial*"))

    # The same request: both skipped, not a byte touched (the manifests hold their start times in ms).
    before = _files(out)
    again = _segment(store, cohort, out, "--fastest", "--ml")
    assert _state(again) == {"a": ("skipped", "matched"), "b": ("skipped", "matched")}
    assert _files(out) == before

    # Other input bytes (b's header) and an older tsrt (a's manifest): both redone, and say why.
    image = nib.load(cohort / "b.nii.gz")
    image.header["descrip"] = b"re-exported by the PACS"
    nib.save(image, cohort / "b.nii.gz")
    edited = _manifest(out, "a")
    edited["request"]["tsrt_version"] = "0.0.1"
    (out / "a" / "a.tsrt.json").write_text(json.dumps(edited))
    changed = _segment(store, cohort, out, "--fastest", "--ml")
    assert _state(changed) == {"a": ("done", "changed"), "b": ("done", "changed")}
    reasons = {case["name"]: case["changes"] for case in changed["cases"]}
    assert reasons == {"a": f"tsrt 0.0.1 -> {__version__}", "b": "the input's bytes changed"}
    assert _manifest(out, "b")["input"]["sha256"] == _sha256(cohort / "b.nii.gz") != manifest["input"]["sha256"]
    assert _manifest(out, "a")["request"]["tsrt_version"] == __version__

    # Another mode (--fast): redone by the 3 mm model.
    fastest_mask = (out / "a" / "a.nii.gz").read_bytes()
    redone = _segment(store, cohort, out, "--fast", "--ml")
    assert _state(redone) == {"a": ("done", "changed"), "b": ("done", "changed")}
    assert "fast: false -> true" in redone["cases"][0]["changes"]
    assert _manifest_graphs(_manifest(out, "a")) == _graphs(store, fast)
    assert _manifest(out, "a")["request"]["options"]["fast"] is True
    assert (out / "a" / "a.nii.gz").read_bytes() != fastest_mask

    # --no-overwrite-changed: a changed request leaves every file as it is and reports the cases as stale.
    before = _files(out)
    kept = _segment(store, cohort, out, "--fast", "--ml", "-rs", "liver", "--no-overwrite-changed")
    assert _state(kept) == {"a": ("stale", "changed"), "b": ("stale", "changed")} and kept["stale"] == 2
    assert 'roi_subset: null -> ["liver"]' in kept["cases"][0]["changes"]
    assert _files(out) == before

    # --roi_subset: redone, cropped by the 6 mm model, only the liver kept.
    cropped = _segment(store, cohort, out, "--fast", "--ml", "-rs", "liver")
    assert _state(cropped) == {"a": ("done", "changed"), "b": ("done", "changed")}
    assert _manifest(out, "a")["request"]["options"]["roi_subset"] == ["liver"]
    assert _manifest_graphs(_manifest(out, "a")) == _graphs(store, fast, fastest)
    labels = np.asanyarray(nib.load(out / "a" / "a.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 5}  # liver is label 5 of task total

    # Another task: redone by the body model.
    body = _segment(store, cohort, out, "-ta", "body", "--fast", "--ml")
    assert _state(body) == {"a": ("done", "changed"), "b": ("done", "changed")}
    assert "task total -> body" in body["cases"][0]["changes"]
    assert _manifest(out, "a")["request"]["name"] == "body"
    assert _manifest_graphs(_manifest(out, "a")) == _graphs(store, "Dataset300_body_6mm_1559subj")

    # An exported model (--model) writing the same file name: redone by it.
    model = _segment(store, cohort, out, "--model", str(DEMO_MODEL))
    assert _state(model) == {"a": ("done", "changed"), "b": ("done", "changed")}
    demo = _manifest(out, "a")
    assert demo["request"]["kind"] == "model" and demo["request"]["name"].startswith("Dataset900_TsrtDemo/")
    assert [graph["sha256"] for graph in demo["request"]["graphs"]] == [
        read_plan(DEMO_MODEL / "fold_0.plan.json").graph_sha256
    ]
    assert demo["request"]["options"] == {
        "folds": ["0"], "tta": True, "step_size": 0.5, "batch_size": 1, "save_probabilities": False, "precision": "fp32",
    }

    # Interrupted cases: a's outputs without a manifest, b only a staging folder: both redone, nothing left over.
    (out / "a" / "a.tsrt.json").unlink()
    shutil.rmtree(out / "b")
    (out / ".tsrt-partial.b").mkdir()
    (out / ".tsrt-partial.b" / "b.nii.gz").write_bytes(b"half a file")
    resumed = _segment(store, cohort, out, "--model", str(DEMO_MODEL))
    assert _state(resumed) == {"a": ("done", "missing"), "b": ("done", "missing")}
    assert {case["changes"] for case in resumed["cases"]} == {"no run manifest"}
    assert not (out / ".tsrt-partial.b").exists()
    assert _manifest(out, "a")["request"] == _manifest(out, "b")["request"] == demo["request"]
    assert nib.load(out / "b" / "b.nii.gz").shape == (122, 101, 30)
    assert _state(_segment(store, cohort, out, "--model", str(DEMO_MODEL))) == {
        "a": ("skipped", "matched"), "b": ("skipped", "matched")
    }


def test_quantizing_redoes_int8_results_and_keeps_the_others(small_task_store: Path, cohort: Path, tmp_path: Path) -> None:
    """Installing or replacing a model's int8 graph changes what `--precision int8` runs, not what fp32 runs: an int8
    cohort is redone after it, an fp32 cohort stays matched (its plan is compared without the int8 record)."""
    from tsrt.models.registry import get_task
    from tsrt.quantization.install import quantize, task_targets

    store = tmp_path / "store"
    shutil.copytree(small_task_store, store)
    fastest = "Dataset298_TotalSegmentator_total_6mm_1559subj"
    plan_path = store / "models" / fastest / "fold_0.plan.json"
    fp32_out, int8_out = tmp_path / "fp32", tmp_path / "int8"

    def install_int8(method: str) -> dict:
        """`tsrt models quantize total --fastest` (fixture weights are random, so forced), the new int8 record."""
        targets = task_targets(get_task("total", fastest=True), store / "models")
        quantize(targets, [cohort / "a.nii.gz"], [cohort / "b.nii.gz"], method=method, force=True, max_tiles=2,
                 show_progress=False)
        record = read_plan(plan_path).int8
        assert record is not None
        return record

    assert _state(_segment(store, cohort, fp32_out, "--fastest", "--ml")) == {"a": ("done", "missing"), "b": ("done", "missing")}
    fp32_files, plan_before = _files(fp32_out), _sha256(plan_path)

    # Quantizing rewrites the plan (its int8 record) but not what fp32 runs: the fp32 cohort is kept as it is.
    first = install_int8("percentile")
    assert _sha256(plan_path) != plan_before
    kept = _segment(store, cohort, fp32_out, "--fastest", "--ml")
    assert _state(kept) == {"a": ("skipped", "matched"), "b": ("skipped", "matched")}, kept["cases"]
    assert _files(fp32_out) == fp32_files

    # An int8 cohort records the int8 graph it ran and the plan with its int8 record; the same request matches.
    made = _segment(store, cohort, int8_out, "--fastest", "--ml", "--precision", "int8")
    assert _state(made) == {"a": ("done", "missing"), "b": ("done", "missing")}
    manifest = _manifest(int8_out, "a")
    assert manifest["precision"] == "int8" and manifest["request"]["options"]["precision"] == "int8"
    [graph] = manifest["request"]["graphs"]
    assert (graph["sha256"], graph["plan_sha256"]) == (first["graph_sha256"], _sha256(plan_path))
    assert graph["sha256"] != read_plan(plan_path).graph_sha256  # not the fp32 graph
    assert _state(_segment(store, cohort, int8_out, "--fastest", "--ml", "--precision", "int8")) == {
        "a": ("skipped", "matched"), "b": ("skipped", "matched")
    }

    # Quantizing again (another calibration method: another graph) redoes the int8 cohort, and only it.
    second = install_int8("minmax")
    assert second["graph_sha256"] != first["graph_sha256"]
    redone = _segment(store, cohort, int8_out, "--fastest", "--ml", "--precision", "int8")
    assert _state(redone) == {"a": ("done", "changed"), "b": ("done", "changed")}
    assert "other model graphs" in redone["cases"][0]["changes"]
    assert [g["sha256"] for g in _manifest(int8_out, "b")["request"]["graphs"]] == [second["graph_sha256"]]
    assert _state(_segment(store, cohort, fp32_out, "--fastest", "--ml")) == {
        "a": ("skipped", "matched"), "b": ("skipped", "matched")
    }
    assert _files(fp32_out) == fp32_files
