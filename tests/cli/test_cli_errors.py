"""Bad input through the real CLI: one line on stderr, a non-zero exit, and no partial output file."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.demo.phantom import make_phantom


@pytest.fixture(scope="session")
def exported_tiny_model(tiny_result_folder: Path, tmp_path_factory) -> Path:
    from tsrt_export.onnx_export import export_model

    out = tmp_path_factory.mktemp("tiny-exported") / "model"
    export_model(tiny_result_folder, out, progress=False)
    return out


def _tsrt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSRT_HOME": os.environ.get("TSRT_HOME", "/tmp/tsrt-test-home")}
    return subprocess.run([sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True, env=env)


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def _bad_inputs(folder: Path) -> dict[str, Path]:
    phantom = make_phantom(shape=(40, 36, 30), spacing=(3.0, 3.0, 3.0))
    good = _write(folder / "good.nii.gz", phantom.image)
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    nan = phantom.image.astype(np.float32)
    nan[3, 3, 3] = np.nan
    sheared = np.diag([3.0, 3.0, 3.0, 1.0])
    sheared[0, 1] = 1.5
    empty_dicom = folder / "empty_dicom"
    empty_dicom.mkdir()
    return {
        "2d image": _write(folder / "flat.nii.gz", phantom.image[:, :, 0]),
        "4d image with several volumes": _write(folder / "four_d.nii.gz", np.stack([phantom.image] * 2, axis=-1)),
        "NaN voxels": _write(folder / "nan.nii.gz", nan),
        "all-constant image": _write(folder / "constant.nii.gz", np.full((40, 36, 30), -1000, dtype=np.int16)),
        "non-orthonormal direction": _write(folder / "sheared.nii.gz", phantom.image, sheared),
        "truncated .nii.gz": truncated,
        "empty DICOM folder": empty_dicom,
        "missing file": folder / "does_not_exist.nii.gz",
    }


@pytest.mark.parametrize(
    "case",
    ["2d image", "4d image with several volumes", "NaN voxels", "all-constant image", "non-orthonormal direction",
     "truncated .nii.gz", "empty DICOM folder", "missing file"],
)
def test_bad_input_is_one_line_nonzero_exit_and_no_output(case: str, exported_tiny_model: Path, tmp_path: Path):
    source = _bad_inputs(tmp_path)[case]
    output = tmp_path / "out" / "seg.nii.gz"
    result = _tsrt("segment", str(source), "-o", str(output), "--model", str(exported_tiny_model), "-q")
    assert result.returncode != 0, f"{case}: exit 0\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsrt: error: "), f"{case}: {result.stderr}"
    assert not output.exists()
    leftovers = list(output.parent.glob("*")) if output.parent.exists() else []
    assert leftovers == [], f"{case}: partial files {leftovers}"


def test_unwritable_output_is_one_line_and_nothing_written(exported_tiny_model: Path, tmp_path: Path):
    phantom = make_phantom(shape=(40, 36, 30), spacing=(3.0, 3.0, 3.0))
    source = _write(tmp_path / "good.nii.gz", phantom.image)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _tsrt("segment", str(source), "-o", str(blocker / "seg.nii.gz"), "--model", str(exported_tiny_model), "-q")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsrt: error: "), result.stderr


def test_good_input_succeeds_with_the_same_command(exported_tiny_model: Path, tmp_path: Path):
    """The control: the same call on a valid image writes a label map on the input grid."""
    phantom = make_phantom(shape=(40, 36, 30), spacing=(3.0, 3.0, 3.0))
    source = _write(tmp_path / "good.nii.gz", phantom.image)
    output = tmp_path / "out" / "seg.nii.gz"
    result = _tsrt("segment", str(source), "-o", str(output), "--model", str(exported_tiny_model), "-q")
    assert result.returncode == 0, result.stderr
    written = nib.load(output)
    assert written.shape == phantom.image.shape and np.allclose(written.affine, nib.load(source).affine)
    with gzip.open(output) as handle:
        assert handle.read(4)  # a complete gzip stream
