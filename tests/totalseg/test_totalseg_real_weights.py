"""Every command of ../shared/README.md with the real TotalSegmentator weights, against its reference outputs.

Runs only when TSRT_TEST_TOTALSEG_HOME points at a TotalSegmentator home holding the real weights
(its nnunet/results folder, as TotalSegmentator downloads it): they cannot be downloaded here. The
models are imported into a temporary TSRT_HOME with `tsrt models import`, then each README command
runs through `tsrt` with TotalSegmentator's own spelling (only the program name changes). Criteria
are TotalSegmentator's own test criteria (tests/test_end_to_end.py): mean Dice over the reference's
classes > 0.99; statistics volumes within rtol = atol = 3e-2, intensities within 2.0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

HOME_VARIABLE = "TSRT_TEST_TOTALSEG_HOME"
MIN_DICE = 0.99
VOLUME_TOLERANCE = 3e-2  # TotalSegmentator's np.allclose(rtol=3e-2, atol=3e-2)
MAX_INTENSITY_DIFFERENCE = 2.0

#: `tsrt models import` calls that cover every README command.
IMPORTS = (("total", "--with-optional"), ("total", "--fast"), ("total_mr", "--with-optional"))

#: reference file -> (input, TotalSegmentator arguments after `-i INPUT -o OUTPUT`), as in ../shared/README.md.
README_COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "example_seg.nii.gz": ("example_ct_sm.nii.gz", ("-bs", "--ml")),
    "example_seg_mr.nii.gz": ("example_mr_sm.nii.gz", ("-ta", "total_mr", "--ml")),
    "example_seg_roi_subset.nii.gz": ("example_ct_sm.nii.gz", ("--ml", "-rs", "liver", "brain")),
    "example_seg_roi_subset_mr.nii.gz": ("example_mr_sm.nii.gz", ("-ta", "total_mr", "--ml", "-rs", "liver", "brain")),
    "example_seg_fast.nii.gz": ("example_ct_sm.nii.gz", ("--fast", "--ml")),
    "example_seg_fast_force_split.nii.gz": ("example_ct.nii.gz", ("--fast", "--ml", "-fs")),
    "example_seg_fast_body_seg.nii.gz": ("example_ct_sm.nii.gz", ("--fast", "--ml", "-bs")),
    "example_seg_dicom.nii.gz": ("example_ct_dicom", ("--fast", "--ml")),
}


def _tsrt(args: list[str], home: Path):
    from tsrt.cli.root import app, totalsegmentator_argv

    return CliRunner().invoke(app, totalsegmentator_argv(args), env={"TSRT_HOME": str(home)})


@pytest.fixture(scope="module")
def real_home() -> Path:
    value = os.environ.get(HOME_VARIABLE)
    if not value:
        pytest.skip(f"{HOME_VARIABLE} is not set: point it at a TotalSegmentator home with the real weights to run")
    home = Path(value).expanduser()
    if not (home / "nnunet" / "results").is_dir():
        pytest.skip(f"{HOME_VARIABLE}={home} has no nnunet/results folder (not a TotalSegmentator home with weights)")
    return home


@pytest.fixture(scope="module")
def tsrt_home(real_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nnunetv2", reason="importing TotalSegmentator weights needs the export extra")
    home = tmp_path_factory.mktemp("tsrt_home_real")
    for task, flag in IMPORTS:
        result = _tsrt(["models", "import", task, flag, "--totalseg-home", str(real_home), "-q"], home)
        assert result.exit_code == 0, (result.output, result.exception)
    return home


def dice_over_reference_classes(reference: np.ndarray, prediction: np.ndarray) -> float:
    """TotalSegmentator's dice_score_multilabel: mean Dice over the classes present in the reference."""
    scores = []
    for label in np.unique(reference)[1:]:
        expected, found = reference == label, prediction == label
        overlap = np.count_nonzero(expected & found)
        scores.append(2.0 * overlap / (np.count_nonzero(expected) + np.count_nonzero(found) + 1e-6))
    return float(np.mean(scores))


@pytest.mark.parametrize("reference", list(README_COMMANDS))
def test_readme_command_matches_the_reference(
    reference: str, tsrt_home: Path, shared_data: Path, tmp_path: Path
) -> None:
    source, arguments = README_COMMANDS[reference]
    output = tmp_path / "seg.nii.gz"
    result = _tsrt(["-i", str(shared_data / source), "-o", str(output), "-q", *arguments], tsrt_home)
    assert result.exit_code == 0, (result.output, result.exception)
    expected = np.asanyarray(nib.load(shared_data / reference).dataobj)
    found = np.asanyarray(nib.load(output).dataobj)
    assert found.shape == expected.shape
    dice = dice_over_reference_classes(expected, found)
    print(f"{reference}: mean Dice {dice:.5f}")
    assert dice > MIN_DICE, f"{reference}: mean Dice {dice:.5f}"


def test_fast_statistics_match_the_reference(tsrt_home: Path, shared_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "masks"
    source = shared_data / "example_ct_sm.nii.gz"
    arguments = ["-i", str(source), "-o", str(output), "--fast", "--statistics", "-sii", "-q"]
    result = _tsrt(arguments, tsrt_home)
    assert result.exit_code == 0, (result.output, result.exception)
    expected = json.loads((shared_data / "example_seg_fast_statistics.json").read_text())
    found = json.loads((output / "statistics.json").read_text())
    assert list(found) == list(expected)
    volumes = np.array([[expected[k]["volume"], found[k]["volume"]] for k in expected])
    intensities = np.array([[expected[k]["intensity"], found[k]["intensity"]] for k in expected])
    assert np.allclose(volumes[:, 1], volumes[:, 0], rtol=VOLUME_TOLERANCE, atol=VOLUME_TOLERANCE)
    assert np.abs(intensities[:, 1] - intensities[:, 0]).max() < MAX_INTENSITY_DIFFERENCE
