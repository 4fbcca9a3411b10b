"""The TotalSegmentator-facing CLI and task plumbing, without models: option spellings, errors, side commands.

Parity of the masks themselves is tests/test_totalseg_parity.py; these run in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tsrt.cli.root import app, totalsegmentator_argv
from tsrt.models.registry import get_task


def _invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, totalsegmentator_argv(list(args)), env=env)


def _main(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The console script as a user runs it (TsrtError -> one stderr line + exit code)."""
    env = {**os.environ, "TSRT_HOME": str(home), "PYTHONUTF8": "1"}  # messages may hold non-ASCII (—)
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
    )


def _write_ct(path: Path, seed: int) -> Path:
    voxels = np.random.default_rng(seed).integers(-1000, 1000, (20, 18, 16)).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


@pytest.fixture()
def ct(tmp_path: Path) -> Path:
    return _write_ct(tmp_path / "ct.nii.gz", 0)


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace the task pipeline by a recorder of the arguments the CLI passes."""
    import tsrt.totalseg

    calls: dict = {}

    def record(input, output, **kwargs):
        calls.update(input=input, output=output, **kwargs)

    monkeypatch.setattr(tsrt.totalseg, "segment", record)
    return calls


def test_totalsegmentator_command_line_runs_unchanged_under_tsrt(captured: dict, ct: Path, tmp_path: Path) -> None:
    """A TotalSegmentator call with the program renamed: argparse spellings, multi-value -rs, -d cpu."""
    result = _invoke(
        "-i", str(ct), "-o", str(tmp_path / "seg.nii.gz"), "-ta", "total", "-rs", "liver", "brain", "--ml", "-f",
        "-bs", "-fs", "-s", "-sii", "-v1o", "-d", "cpu", "-nr", "2", "-ns", "4", "-q", "-rc", "-ot", "nifti", "-p",
        "-rmb", "-sp", str(tmp_path / "probs.npz"),
    )
    assert result.exit_code == 0, result.output
    assert captured["input"] == ct and captured["output"] == tmp_path / "seg.nii.gz"
    assert captured["roi_subset"] == ["liver", "brain"]
    assert captured["fast"] and captured["ml"] and captured["body_seg"] and captured["force_split"]
    assert captured["statistics"] and captured["statistics_exclude_masks_at_border"] is False
    assert captured["v1_order"] and captured["robust_crop"] and captured["preview"] and captured["quiet"]
    assert captured["device"] == "cpu" and captured["output_type"] == "nifti" and captured["task"] == "total"
    assert captured["remove_small_blobs"] == 200.0  # -rmb alone: TotalSegmentator's 200 mm3
    assert captured["save_probabilities"] == str(tmp_path / "probs.npz")


def test_tsrt_spellings_map_to_the_same_arguments(captured: dict, ct: Path, tmp_path: Path) -> None:
    result = _invoke(
        "segment", str(ct), "-o", str(tmp_path / "out"), "--task", "total_mr", "--roi-subset", "liver",
        "--roi-subset", "brain", "--force-split", "--body-seg", "--fastest", "--v1-order", "--robust-crop",
        "--stats-aggregation", "median", "--no-derived-masks", "--provider", "cpu",
    )
    assert result.exit_code == 0, result.output
    assert captured["task"] == "total_mr" and captured["roi_subset"] == ["liver", "brain"]
    assert captured["fastest"] and not captured["fast"] and captured["force_split"] and captured["body_seg"]
    assert captured["stats_aggregation"] == "median" and captured["no_derived_masks"] and captured["provider"] == "cpu"
    assert captured["ml"] is False and captured["remove_small_blobs"] is False


def test_argv_rewriting_keeps_other_commands() -> None:
    assert totalsegmentator_argv(["-i", "a.nii.gz", "-o", "b", "-rs", "liver", "brain"]) == [
        "segment", "-i", "a.nii.gz", "-o", "b", "-rs", "liver", "-rs", "brain"
    ]
    assert totalsegmentator_argv(["models", "list"]) == ["models", "list"]
    assert totalsegmentator_argv(["--help"]) == ["--help"]
    assert totalsegmentator_argv(["-i", "a", "-rmb", "-o", "b"]) == ["segment", "-i", "a", "-rmb", "200", "-o", "b"]
    assert totalsegmentator_argv(["-i", "a", "-rmb", "50.5"]) == ["segment", "-i", "a", "-rmb", "50.5"]
    # -f is --fast (a flag), so it must not swallow the input that follows it
    assert totalsegmentator_argv(["segment", "-f", "ct.nii.gz", "-o", "x"]) == ["segment", "-f", "ct.nii.gz", "-o", "x"]
    # -s [PATH] (TotalSegmentator 2.18): any value in its own call (-i); beside tsrt's INPUT only a .json name
    assert totalsegmentator_argv(["-i", "a", "-o", "b", "-s"]) == ["segment", "-i", "a", "-o", "b", "-s", ""]
    assert totalsegmentator_argv(["-i", "a", "-s", "st", "-o", "b"]) == ["segment", "-i", "a", "-s", "st", "-o", "b"]
    assert totalsegmentator_argv(["segment", "-s", "ct.nii.gz", "-o", "x"]) == [
        "segment", "-s", "", "ct.nii.gz", "-o", "x"
    ]
    assert totalsegmentator_argv(["segment", "ct.nii.gz", "--statistics", "st.json"])[-1] == "st.json"
    assert totalsegmentator_argv(["phase", "ct.nii.gz", "-s", "stats"]) == ["phase", "ct.nii.gz", "-s", "stats"]


def test_statistics_path_and_skip_saving_reach_the_task(captured: dict, ct: Path, tmp_path: Path) -> None:
    result = _invoke("-i", str(ct), "-o", str(tmp_path / "out"), "-s", str(tmp_path / "st"), "-ss")
    assert result.exit_code == 0, result.output
    assert captured["statistics"] == str(tmp_path / "st") and captured["skip_saving"] is True
    result = _invoke("segment", str(ct), "-o", str(tmp_path / "out"), "--statistics")
    assert result.exit_code == 0, result.output
    assert captured["statistics"] is True and captured["skip_saving"] is False


def test_an_ml_output_named_for_no_nifti_file_is_refused_before_the_models(ct: Path, tmp_path: Path) -> None:
    """`-o x.001 --ml`: TotalSegmentator (nibabel) fails when saving; tsrt says so before any work."""
    result = _main("segment", str(ct), "-o", str(tmp_path / "x.001"), "--ml", home=tmp_path / "empty_home")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "end its name in .nii.gz or .nii" in lines[0] and not list(tmp_path.glob("x.001*"))


@pytest.mark.parametrize("flags", [("-s", "stats.json"), ("--skip_saving",)])
def test_one_image_options_are_refused_for_cohorts(tmp_path: Path, flags: tuple) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    _write_ct(cases / "a.nii.gz", 0)
    result = _main("segment", str(cases), "-o", str(tmp_path / "out"), *flags, home=tmp_path / "home")
    assert result.returncode != 0 and "works on one image, not a cohort" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), "tsrt models import total --fast --totalseg-home DIR"),
        (("--roi_subset", "liver"), "tsrt models import total --fast --with-optional --totalseg-home DIR"),
        (("--body_seg",), "tsrt models download total --fast --with-optional"),
    ],
)
def test_missing_models_name_the_install_command(ct: Path, tmp_path: Path, flags: tuple, expected: str) -> None:
    """Offline (else the run fetches them on first use, tests/totalseg/test_models_on_first_use.py)."""
    result = _main(
        "segment", str(ct), "-o", str(tmp_path / "out"), "--fast", "--offline", *flags, home=tmp_path / "empty_home"
    )
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsrt: error:"), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--roi_subset", "not_an_organ"), "not_an_organ is not a class of task total"),
        (("--task", "body", "--roi_subset", "liver"), "--roi_subset works with the tasks total"),
        (("--task", "nonsense"), "Unknown task 'nonsense'"),
        (("--save-probabilities",), "--save_probabilities needs a file for the probabilities"),
        (("--output_type", "dicom_seg"), "needs a DICOM series as input"),
        (("--output_type", "png"), "Unknown output type 'png'"),
    ],
)
def test_bad_options_fail_with_one_line(ct: Path, tmp_path: Path, flags: tuple, message: str) -> None:
    result = _main("segment", str(ct), "-o", str(tmp_path / "out"), *flags, home=tmp_path / "home")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_tasks_lists_tasks_and_classes() -> None:
    result = _invoke("tasks")
    assert result.exit_code == 0
    assert "total " in result.output and "total_mr" in result.output and "--roi_subset" in result.output
    result = _invoke("tasks", "total")
    lines = result.output.splitlines()
    assert len(lines) == 1 + 117 and "   5  liver" in lines


def test_doctor_reports_providers_and_an_empty_store(tmp_path: Path) -> None:
    result = _invoke("doctor", env={"TSRT_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider" in result.output and "onnxruntime" in result.output
    assert "models: 0 complete" in result.output and "runnable tasks: none yet" in result.output


def _lung_labels() -> tuple[np.ndarray, dict[int, str]]:
    classes = dict(get_task("total").classes)
    inverse = {name: label for label, name in classes.items()}
    labels = np.zeros((12, 10, 8), dtype=np.uint8)
    labels[1:3] = inverse["lung_upper_lobe_left"]
    labels[4:6] = inverse["lung_lower_lobe_right"]
    labels[7:9] = inverse["liver"]
    return labels, classes


def test_combine_masks_from_a_multilabel_file_and_from_a_mask_folder(tmp_path: Path) -> None:
    from tsrt.pipeline.label_table import read_label_table
    from tsrt.pipeline.read import Image
    from tsrt.pipeline.write import write_label_map

    labels, classes = _lung_labels()
    image = Image(labels, np.diag([2.0, 2.0, 2.0, 1.0]), None, "test")
    write_label_map(labels, image, tmp_path / "seg.nii.gz", label_names=classes)
    folder = tmp_path / "masks"
    for label, name in classes.items():
        write_label_map((labels == label).astype(np.uint8), image, folder / f"{name}.nii.gz")
    expected = ((labels > 0) & (labels != [k for k, v in classes.items() if v == "liver"][0])).astype(np.uint8)
    for source in (tmp_path / "seg.nii.gz", folder):
        out = tmp_path / f"lung_from_{source.name}.nii.gz"
        result = _invoke("combine-masks", str(source), "-o", str(out), "-m", "lung", "--ml")
        assert result.exit_code == 0, result.output
        combined = nib.load(out)
        assert np.array_equal(np.asanyarray(combined.dataobj), expected)
        assert read_label_table(combined) == {1: "lung"}
    # No ending: combined.nii, uncompressed, as totalseg_combine_masks (nibabel's save) names it.
    result = _invoke("combine-masks", str(folder), "-o", str(tmp_path / "combined"), "-m", "lung")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "combined.nii").read_bytes()[:2] != b"\x1f\x8b" and not (tmp_path / "combined").exists()
    assert not list(tmp_path.glob(".*tsrt-partial*"))


def test_combine_masks_refuses_unknown_kinds_and_missing_inputs(tmp_path: Path) -> None:
    result = _main("combine-masks", str(tmp_path), "-o", str(tmp_path / "x.nii.gz"), "-m", "heart", home=tmp_path)
    assert result.returncode != 0 and "Unknown combination 'heart'" in result.stderr
    missing = tmp_path / "nope"
    result = _main("combine-masks", str(missing), "-o", str(tmp_path / "x.nii.gz"), "-m", "lung", home=tmp_path)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_import_tsrt_is_light_and_the_task_layer_is_torch_free() -> None:
    code = (
        "import sys, tsrt\n"
        "heavy = [m for m in ('onnxruntime', 'numba', 'nibabel') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import tsrt.totalseg, tsrt.cli\n"
        "assert callable(tsrt.segment)\n"
        # (scipy is not checked: nibabel imports it by itself where it is installed)
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nnunetv2', 'totalsegmentator')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace"
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- pipeline plumbing


class _ConstantRunner:
    """Stands in for the ONNX models: a model predicts one label everywhere (records the calls)."""

    def __init__(self, value: int, per_model: dict[str, int] | None = None) -> None:
        self.value, self.per_model, self.calls = value, per_model or {}, []
        self.seconds: dict[str, float] = {}
        self.provider = self.provider_used = "cpu"
        self.precision_used = "fp32"

    def predict(self, part, values, affine, *, probabilities=None):
        self.calls.append((part.name, values.shape))
        return np.full(values.shape, self.per_model.get(part.name, self.value), dtype=np.uint8)


def test_an_empty_crop_gives_an_empty_result_without_running_the_task(ct: Path) -> None:
    from tsrt.totalseg.request import build_request
    from tsrt.totalseg.runner import run_task
    from tsrt.totalseg.source import read_source

    runner = _ConstantRunner(0)  # the coarse model finds nothing
    request = build_request("total", fast=True, roi_subset=["liver"])
    result = run_task(read_source(ct), request, runner)
    assert not result.labels.any() and result.labels.shape == (20, 18, 16)
    assert result.label_map == {5: "liver"}
    assert [name for name, _ in runner.calls] == ["Dataset298_TotalSegmentator_total_6mm_1559subj"]


def test_roi_subset_runs_only_the_parts_holding_the_classes(ct: Path) -> None:
    from tsrt.totalseg.request import build_request
    from tsrt.totalseg.runner import run_task
    from tsrt.totalseg.source import read_source

    task = get_task("total")
    runner = _ConstantRunner(1, {task.roi_subset_crop.source_model.name: 5})  # the coarse model sees liver
    request = build_request("total", roi_subset=["liver", "vertebrae_L1"])
    result = run_task(read_source(ct), request, runner)
    ran = [name for name, _ in runner.calls]
    assert ran[0] == task.roi_subset_crop.source_model.name
    expected_parts = [p.name for p in task.parts if {"liver", "vertebrae_L1"} & set(p.classes.values())]
    assert ran[1:] == expected_parts and len(expected_parts) == 2
    # every part says "its label 1" everywhere; the later part wins, then only roi classes survive
    assert set(np.unique(result.labels)) <= {0, 5, 31} and result.label_map == {5: "liver", 31: "vertebrae_L1"}


def test_mr_roi_subset_always_crops_with_the_3mm_model_and_ignores_body_seg(ct: Path) -> None:
    from tsrt.totalseg.request import build_request, models_to_run

    request = build_request("total_mr", roi_subset=["liver"], body_seg=True)
    assert request.robust_roi_crop and not request.body_seg
    needed, _ = models_to_run(request)
    assert "Dataset852_TotalSegMRI_total_3mm_1088subj" in [m.name for m in needed]
    robust, _ = models_to_run(build_request("total", fast=True, roi_subset=["liver"], robust_crop=True))
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in [m.name for m in robust]
    assert "Dataset298_TotalSegmentator_total_6mm_1559subj" not in [m.name for m in robust]


# --------------------------------------------------------------------------------------------- cohorts


def _stub_request(value: int, **options):
    """The run manifest's request of a stub runner that predicts `value` (another value: another request)."""
    from tsrt.outputs.manifest import GraphRecord, RunRequest

    return RunRequest("task", "total", options, (GraphRecord("stub", "0", f"{value:064x}", "0" * 64),))


def test_cohort_folder_is_resumable_and_survives_a_broken_case(tmp_path: Path) -> None:
    from tsrt.cohort.cases import find_cases, run_cohort
    from tsrt.totalseg.outputs import OutputOptions
    from tsrt.totalseg.request import build_request

    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    for index in range(2):
        _write_ct(cases_dir / f"case{index}.nii.gz", index)
    (cases_dir / "broken.nii.gz").write_bytes(b"not a nifti")
    (cases_dir / "notes.txt").write_text("ignored")
    request = build_request("total", fast=True)
    options = OutputOptions(multilabel=True, statistics=True)
    cases = find_cases(cases_dir, tmp_path / "out", multilabel=True)
    assert [case.name for case in cases] == ["broken", "case0", "case1"]
    assert cases[1].output == tmp_path / "out" / "case0" / "case0.nii.gz"

    summary = run_cohort(cases, request, _ConstantRunner(5), options, _stub_request(5), progress=False)
    assert summary.done == ["case0", "case1"] and [name for name, _ in summary.failed] == ["broken"]
    assert "cannot be read as NIfTI" in summary.failed[0][1] and "1 failed" in summary.line()
    written = nib.load(tmp_path / "out" / "case1" / "case1.nii.gz")
    assert np.all(np.asanyarray(written.dataobj) == 5)  # the stub's liver everywhere
    assert (tmp_path / "out" / "case1" / "statistics.json").is_file()

    again = run_cohort(cases, request, _ConstantRunner(5), options, _stub_request(5), progress=False)
    assert again.skipped == ["case0", "case1"] and again.done == [] and len(again.failed) == 1
    redone = run_cohort(
        cases[1:], request, _ConstantRunner(7), options, _stub_request(5), overwrite=True, progress=False
    )
    assert redone.done == ["case0", "case1"]
    assert np.all(np.asanyarray(nib.load(tmp_path / "out" / "case1" / "case1.nii.gz").dataobj) == 7)


def test_cohort_list_file_and_per_class_completeness(tmp_path: Path) -> None:
    from tsrt.cohort.cases import expected_outputs, find_cases, run_cohort
    from tsrt.totalseg.outputs import OutputOptions
    from tsrt.totalseg.request import build_request

    image = _write_ct(tmp_path / "a.nii.gz", 0)
    (tmp_path / "list.txt").write_text(f"# cohort\n{image}\n\nsub/b.nii.gz\n")
    (tmp_path / "sub").mkdir()
    _write_ct(tmp_path / "sub" / "b.nii.gz", 1)
    cases = find_cases(tmp_path / "list.txt", tmp_path / "out", multilabel=False)
    assert [(c.name, c.input) for c in cases] == [("a", image), ("b", tmp_path / "sub" / "b.nii.gz")]
    request = build_request("total", fast=True, roi_subset=["liver", "spleen"])
    options = OutputOptions()
    assert sorted(p.name for p in expected_outputs(cases[0], request, options)) == ["liver.nii.gz", "spleen.nii.gz"]
    summary = run_cohort(cases, request, _ConstantRunner(5), options, _stub_request(5), progress=False)
    assert summary.done == ["a", "b"]
    (tmp_path / "out" / "b" / "spleen.nii.gz").unlink()  # a case missing an output is not finished
    again = run_cohort(cases, request, _ConstantRunner(5), options, _stub_request(5), progress=False)
    assert again.skipped == ["a"] and again.done == ["b"]
    assert [record.changes for record in again.records] == ["", "spleen.nii.gz is missing"]


def test_single_images_are_not_cohorts(tmp_path: Path, ct: Path) -> None:
    from tsrt.cohort.cases import find_cases

    dicom_folder = tmp_path / "dicom"
    dicom_folder.mkdir()
    (dicom_folder / "IM0001").write_bytes(b"")
    assert find_cases(ct, tmp_path / "out", multilabel=True) is None
    assert find_cases(dicom_folder, tmp_path / "out", multilabel=True) is None


@pytest.mark.parametrize(("body_label", "kept"), [(1, True), (2, False)])
def test_vertebrae_pp_refined_clips_to_the_helper_models_vertebral_bodies(
    ct: Path, body_label: int, kept: bool
) -> None:
    from tsrt.totalseg.request import build_request
    from tsrt.totalseg.runner import run_task
    from tsrt.totalseg.source import read_source

    task = get_task("vertebrae_pp_refined")
    helper = task.helpers[0].model.name
    runner = _ConstantRunner(3, {helper: body_label})  # every voxel: vertebra label 3; the helper says body or disc
    result = run_task(read_source(ct), build_request("vertebrae_pp_refined"), runner)
    assert [name for name, _ in runner.calls] == [helper, task.parts[0].name]
    assert result.labels.any() == kept


def test_remove_small_blobs_drops_small_components_of_every_class() -> None:
    from tsrt.totalseg.request import build_request
    from tsrt.totalseg.runner import ImageRun, postprocess_lowres

    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:6, 1:6, 1:6] = 5  # 125 voxels of 27 mm3 = 3375 mm3: kept
    labels[8, 8, 8] = 5  # 27 mm3: dropped
    labels[8, 1, 1] = 1  # 27 mm3: dropped
    request = build_request("total", fast=True, remove_small_blobs=True)
    assert request.remove_small_blobs_mm3 == 200.0
    task = request.task
    run = ImageRun(task.name, task.parts, False, task.classes, remove_small_blobs_mm3=200.0)
    cleaned = postprocess_lowres(labels.copy(), np.diag([3.0, 3.0, 3.0, 1.0]), run)
    assert np.count_nonzero(cleaned == 5) == 125 and np.count_nonzero(cleaned == 1) == 0
    with pytest.raises(Exception, match="positive volume"):
        build_request("total", remove_small_blobs=-1)


def test_roi_subset_accepts_one_name_and_rejects_none() -> None:
    from tsrt.models.registry import TaskError
    from tsrt.totalseg.request import build_request

    assert build_request("total", roi_subset="liver").roi_subset == ("liver",)
    with pytest.raises(TaskError, match="at least one class"):
        build_request("total", roi_subset=[])
