"""tsrt's TotalSegmentator task layer against official TotalSegmentator 2.18 on the same weights.

One TotalSegmentator home (nnU-Net result folders in TotalSegmentator's layout) is written per
module, imported into a temporary TSRT_HOME with `tsrt models import`, and every mode below is run
twice on the real example images: by official TotalSegmentator (its python API, in a subprocess)
and by `tsrt segment` (the CLI, in-process). Outputs are compared voxel by voxel.

Weights: "confident" ones (the trained demo checkpoint's backbone, see tsrt_export.fixtures) when
the demo model exists, else seeded random ones. Random networks put near-tied logits everywhere,
so float noise between torch and ONNX Runtime flips a few voxels: there we require >= 99.5 %
voxel agreement; with confident weights mean Dice >= 0.999 over present classes and >= 99.95 %.

Why official TotalSegmentator runs in a subprocess: importing totalsegmentator.nnunet patches
nnU-Net's predictor for the whole process, which would change the nnU-Net reference of other
parity tests. The subprocess refuses every network lookup, and runs nnU-Net's in-process
prediction path (predict_from_files_sequential: the same preprocessing, network and export
functions as predict_from_files, without spawning worker processes that each import torch) -
otherwise every model call costs several seconds of worker start-up. All official modes run in
that one process, started first, while the models are imported and tsrt runs.

Costs are kept down by small networks (48^3 patches), one official process, and a cropped copy of
example_ct_sm for the 1.5 mm modes (total's 5 parts, roi_subset), which dominate the run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from totalseg_official import OfficialProcess, start_official

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Random-weight criterion (near-tied logits flip a few voxels between torch and ONNX Runtime).
RANDOM_MIN_AGREEMENT = 0.995
#: Confident-weight criteria.
CONFIDENT_MIN_AGREEMENT = 0.9995
CONFIDENT_MIN_DICE = 0.999
#: statistics.json values must agree this closely (relative).
STATISTICS_RTOL = 1e-3

#: Confident weights: on the real CT the phantom-trained demo network answers soft tissue with its lung_left
#: row, so `liver` takes that row; the crop of liver_segments (and roi_subset's liver) is then not empty.
CLASS_ROWS = {"liver": "lung_left"}
#: TotalSegmentator task keys of tsrt_export.fixtures the modes below need.
HOME_TASKS = ("total", "total_fast", "total_fastest", "total_mr", "body_fast", "liver_segments")
#: `tsrt models import` calls that bring those models into the store.
IMPORTS = (
    ("total", "--with-optional"), ("total", "--fast"), ("total_mr",), ("body", "--fast"), ("liver_segments",)
)


@dataclass(frozen=True)
class Mode:
    """One TotalSegmentator call: input, the python-API keywords, and the same call as tsrt CLI flags."""

    input: str  # file or folder in ../shared/data, or a name in CROPS
    official: dict
    cli: tuple[str, ...]
    multilabel: bool = True
    statistics: bool = False
    extra: dict = field(default_factory=dict)


#: Crops (in voxels) of shared images that keep the expensive modes cheap: 1.5 mm modes run 5 (CT) or 2 (MR)
#: models on 4x the voxels, and force_split runs 3 pieces. Same data, same geometry handling (MR stays LPS).
CROPS: dict[str, tuple[str, tuple[slice, slice, slice]]] = {
    "ct_sm_crop.nii.gz": ("example_ct_sm.nii.gz", np.s_[30:78, 25:65, :]),
    "mr_sm_crop.nii.gz": ("example_mr_sm.nii.gz", np.s_[20:80, 15:75, :]),
    "ct_crop.nii.gz": ("example_ct.nii.gz", np.s_[20:100, 15:85, :]),
}

MODES: dict[str, Mode] = {
    "fast": Mode("example_ct_sm.nii.gz", {"fast": True}, ("--fast", "--preview")),
    "total": Mode("ct_sm_crop.nii.gz", {"statistics": True}, ("--statistics",), statistics=True),
    # Two parts (organs, cardiac; the later overwrites) around a 6 mm crop. Not README's "liver brain": with the
    # confident demo weights the cardiac part covers liver and nothing says brain, which would leave an empty map.
    "roi_subset": Mode(
        "ct_sm_crop.nii.gz", {"roi_subset": ["liver", "spleen", "aorta"]}, ("--roi_subset", "liver", "spleen", "aorta")
    ),
    # The whole example_ct: with the confident demo weights the body model finds a trunk only with its full
    # context (on example_ct_sm its blobs are all below the 50000 mm3 cut, so the crop would be empty).
    "body_seg": Mode("example_ct.nii.gz", {"fast": True, "body_seg": True}, ("--fast", "-bs")),
    "force_split": Mode("ct_crop.nii.gz", {"fast": True, "force_split": True}, ("--fast", "-fs")),
    "total_mr": Mode("mr_sm_crop.nii.gz", {"task": "total_mr"}, ("-ta", "total_mr")),
    # A cropped sub-task: the 6 mm total model finds the liver, the input is cut to it plus a 10-voxel margin,
    # resampled to 0.8x0.8x1.5 mm for the sub-task model, and the result pasted back into the full grid.
    "liver_segments": Mode("ct_sm_crop.nii.gz", {"task": "liver_segments"}, ("-ta", "liver_segments")),
    "dicom": Mode("example_ct_dicom", {"fast": True}, ("--fast",)),
    "masks_statistics": Mode(
        "example_ct_sm.nii.gz", {"fast": True, "statistics": True}, ("--fast", "--statistics"),
        multilabel=False, statistics=True,
    ),
    "body_masks": Mode(
        "example_ct_sm.nii.gz", {"task": "body", "fast": True}, ("--task", "body", "--fast"), multilabel=False
    ),
}


# --------------------------------------------------------------------------------------------- official


_OFFICIAL_RUNNER = """
def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    from totalsegmentator.python_api import totalsegmentator

    sequential_nnunet()
    statuses = {}
    for name, job in jobs.items():
        try:
            totalsegmentator(device="cpu", quiet=True, nr_thr_saving=1, **job)
            statuses[name] = "ok"
        except Exception:
            statuses[name] = traceback.format_exc()
    return statuses
"""


class OfficialRuns:
    """Official TotalSegmentator running every mode in one background process."""

    def __init__(self, process: OfficialProcess, outputs: dict[str, Path]) -> None:
        self.process, self.outputs = process, outputs

    def output(self, mode: str) -> Path:
        status = self.process.result().get(mode)
        if status is None:
            raise AssertionError(f"official TotalSegmentator did not run mode {mode}")
        assert status == "ok", f"official TotalSegmentator failed on {mode}:\n{status}"
        return self.outputs[mode]


def _output_path(root: Path, mode: str) -> Path:
    spec = MODES[mode]
    return root / mode / ("seg.nii.gz" if spec.multilabel else "masks")


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_weights() -> Path | None:
    from tsrt_export.fixtures import find_demo_checkpoint

    return find_demo_checkpoint(REPO_ROOT)


@pytest.fixture(scope="module")
def ts_home(tmp_path_factory: pytest.TempPathFactory, demo_weights: Path | None) -> Path:
    pytest.importorskip("totalsegmentator", reason="parity needs official TotalSegmentator (dev environment)")
    from tsrt_export.fixtures import write_totalseg_home

    home = tmp_path_factory.mktemp("ts_home")
    return write_totalseg_home(home, HOME_TASKS, source_checkpoint=demo_weights, small=True, class_rows=CLASS_ROWS)


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every mode's input: shared files as they are, crops written next to the test's temp files."""
    folder = tmp_path_factory.mktemp("inputs")
    for name, (source, box) in CROPS.items():
        nib.save(nib.load(shared_data / source).slicer[box], folder / name)
    return {
        name: (folder / spec.input if spec.input in CROPS else shared_data / spec.input) for name, spec in MODES.items()
    }


@pytest.fixture(scope="module")
def official(ts_home: Path, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> OfficialRuns:
    """Start official TotalSegmentator on every mode now; `output()` waits for it."""
    work = tmp_path_factory.mktemp("official")
    outputs = {mode: _output_path(work, mode) for mode in MODES}
    for output in outputs.values():
        output.parent.mkdir(parents=True)  # upstream creates only the last folder level for statistics
    jobs = {
        mode: {"input": str(inputs[mode]), "output": str(outputs[mode]), "ml": spec.multilabel, **spec.official}
        for mode, spec in MODES.items()
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_OFFICIAL_RUNNER, work, str(work / "jobs.json"), home=ts_home)
    yield OfficialRuns(process, outputs)
    process.kill()


def _cli(*args: str, env: dict[str, str]):
    from tsrt.cli.root import app, totalsegmentator_argv

    result = CliRunner().invoke(app, totalsegmentator_argv(list(args)), env=env, catch_exceptions=True)
    return result


@pytest.fixture(scope="module")
def tsrt_home(ts_home: Path, official: OfficialRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSRT_HOME holding every model the modes need, imported with `tsrt models import`."""
    pytest.importorskip("nnunetv2", reason="importing models needs the export extra")
    home = tmp_path_factory.mktemp("tsrt_home")
    for task, *flags in IMPORTS:
        arguments = ("models", "import", task, *flags, "--totalseg-home", str(ts_home), "-q")
        result = _cli(*arguments, env={"TSRT_HOME": str(home)})
        assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.fixture(scope="module")
def tsrt_runs(tsrt_home: Path, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`tsrt segment` on every mode (while official TotalSegmentator still runs): output path or the failure."""
    work = tmp_path_factory.mktemp("tsrt")
    runs: dict[str, object] = {}
    for mode, spec in MODES.items():
        output = _output_path(work, mode)
        args = ["segment", str(inputs[mode]), "-o", str(output), "-q", "--device", "cpu", *spec.cli]
        if spec.multilabel:
            args.append("--ml")
        result = _cli(*args, env={"TSRT_HOME": str(tsrt_home)})
        failure = AssertionError(f"tsrt {' '.join(args)}: {result.output} {result.exception!r}")
        runs[mode] = output if result.exit_code == 0 else failure
    return runs


# --------------------------------------------------------------------------------------------- comparison


def agreement_and_dice(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(share of equal voxels, mean Dice over classes present in either map)."""
    assert expected.shape == actual.shape
    present = sorted((set(np.unique(expected)) | set(np.unique(actual))) - {0})
    dice = []
    for label in present:
        a, b = expected == label, actual == label
        dice.append(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return float(np.mean(expected == actual)), float(np.mean(dice)) if dice else 1.0


def assert_parity(expected: np.ndarray, actual: np.ndarray, confident: bool, what: str) -> None:
    agreement, dice = agreement_and_dice(expected, actual)
    weights = "confident" if confident else "random"
    print(f"{what}: voxel agreement {agreement:.6f}, mean Dice {dice:.6f} ({weights} weights)")
    if confident:
        assert agreement >= CONFIDENT_MIN_AGREEMENT and dice >= CONFIDENT_MIN_DICE, (what, agreement, dice)
    else:
        assert agreement >= RANDOM_MIN_AGREEMENT, (what, agreement, dice)


def _label_table(path: Path) -> dict[int, str]:
    from tsrt.pipeline.label_table import read_label_table

    return read_label_table(nib.load(path))


def _compare_statistics(official_json: Path, tsrt_json: Path) -> None:
    expected, actual = json.loads(official_json.read_text()), json.loads(tsrt_json.read_text())
    assert list(actual) == list(expected)
    for name, values in expected.items():
        for key in ("volume", "intensity"):
            assert actual[name][key] == pytest.approx(values[key], rel=STATISTICS_RTOL, abs=1e-6), (name, key)


def _result(runs: dict[str, object], mode: str) -> Path:
    outcome = runs[mode]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[return-value]


@pytest.mark.parametrize("mode", [m for m, spec in MODES.items() if spec.multilabel])
def test_multilabel_output_matches_totalsegmentator(
    mode: str, official: OfficialRuns, tsrt_runs: dict, demo_weights: Path | None
) -> None:
    ours = _result(tsrt_runs, mode)
    theirs = official.output(mode)
    ours_image, theirs_image = nib.load(ours), nib.load(theirs)
    assert ours_image.shape == theirs_image.shape
    assert np.allclose(ours_image.affine, theirs_image.affine, atol=1e-4)
    assert ours_image.get_data_dtype() == np.uint8
    assert _label_table(ours) == _label_table(theirs)
    expected, actual = np.asanyarray(theirs_image.dataobj), np.asanyarray(ours_image.dataobj)
    assert len(np.unique(expected)) > 1, "the official run produced an empty map: the comparison would prove nothing"
    assert_parity(expected, actual, demo_weights is not None, mode)
    if MODES[mode].statistics:
        _compare_statistics(theirs.parent / "statistics.json", ours.parent / "statistics.json")
    if "--preview" in MODES[mode].cli:
        assert (ours.parent / "preview_total.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("mode", [m for m, spec in MODES.items() if not spec.multilabel])
def test_per_class_masks_match_totalsegmentator(
    mode: str, official: OfficialRuns, tsrt_runs: dict, demo_weights: Path | None
) -> None:
    ours = _result(tsrt_runs, mode)
    theirs = official.output(mode)
    expected_files = sorted(p.name for p in theirs.glob("*.nii.gz"))
    assert sorted(p.name for p in ours.glob("*.nii.gz")) == expected_files
    # All masks as one label map (files in name order), so Dice/agreement read like the multilabel modes.
    shape = nib.load(theirs / expected_files[0]).shape
    expected, actual = np.zeros(shape, np.uint16), np.zeros(shape, np.uint16)
    for index, name in enumerate(expected_files, start=1):
        theirs_mask, ours_mask = nib.load(theirs / name), nib.load(ours / name)
        assert np.allclose(ours_mask.affine, theirs_mask.affine, atol=1e-4)
        mask_expected, mask_actual = np.asanyarray(theirs_mask.dataobj), np.asanyarray(ours_mask.dataobj)
        assert set(np.unique(mask_actual)) <= {0, 1}
        expected[mask_expected > 0] = index
        actual[mask_actual > 0] = index
    assert_parity(expected, actual, demo_weights is not None, mode)
    if MODES[mode].statistics:
        _compare_statistics(theirs / "statistics.json", ours / "statistics.json")


def test_python_api_returns_the_same_image_for_a_nibabel_input(
    tsrt_home: Path, official: OfficialRuns, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
    demo_weights: Path | None,
) -> None:
    """tsrt.segment(nibabel image) without output returns the multilabel image, like totalsegmentator()."""
    import tsrt

    monkeypatch.setenv("TSRT_HOME", str(tsrt_home))
    image = nib.load(shared_data / "example_ct_sm.nii.gz")
    result, stats = tsrt.segment(image, None, task="total", fast=True, statistics=True, quiet=True, device="cpu")
    assert isinstance(result, nib.Nifti1Image) and result.shape == image.shape
    expected = np.asanyarray(nib.load(official.output("fast")).dataobj)
    assert_parity(expected, np.asanyarray(result.dataobj), demo_weights is not None, "python api")
    assert len(stats) == 117 and set(next(iter(stats.values()))) == {"volume", "intensity"}


def test_v1_order_renumbers_like_totalsegmentator(
    tsrt_home: Path, official: OfficialRuns, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
    demo_weights: Path | None,
) -> None:
    from totalsegmentator.map_to_binary import class_map  # a plain table module (no nnU-Net patching)

    from tsrt.totalseg import ops
    from tsrt.totalseg.v1_classes import TOTAL_V1_CLASSES
    from tsrt.totalseg.task import segment

    assert dict(TOTAL_V1_CLASSES) == class_map["total_v1"]
    monkeypatch.setenv("TSRT_HOME", str(tsrt_home))
    result = segment(
        shared_data / "example_ct_sm.nii.gz", task="total", fast=True, v1_order=True, quiet=True, device="cpu"
    )
    official_v2 = np.asanyarray(nib.load(official.output("fast")).dataobj)
    expected = ops.reorder_multilabel_like_v1(official_v2, class_map["total"], class_map["total_v1"])
    assert int(np.asanyarray(result.dataobj).max()) <= 104
    assert_parity(expected, np.asanyarray(result.dataobj), demo_weights is not None, "v1 order")
