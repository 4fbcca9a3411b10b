"""`--precision` through the real CLI: refusals are one line before any image is read, nothing is written;
the old `--provider openvino-bf16` equals `--provider openvino --precision bf16` (with a deprecation line);
a bf16 run records bf16 in its manifest. bf16 branches depend on this CPU (native bf16 or not): each is
tested where it applies and skipped, naming the CPU flags, where it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.demo.phantom import make_phantom
from tsrt.demo.run import demo_model_dir
from tsrt.engines.providers import native_bf16

NATIVE_BF16 = native_bf16()
NO_NATIVE = "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo)"
HAS_NATIVE = "this CPU has native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo): bf16 is not refused here"


def _tsrt(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSRT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    phantom = make_phantom(shape=(48, 44, 40), spacing=(3.0, 3.0, 3.0), seed=4243, vary=True)
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image.astype(np.float32), phantom.affine), path)
    return path


def _assert_refused(result: subprocess.CompletedProcess, message: str, out: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tsrt: error: ") and message in lines[0], result.stderr
    assert not out.exists() and not list(out.parent.glob("*.tsrt.json"))


MODEL_REFUSALS = [
    (("--provider", "cpu", "--precision", "fp16"), "fp16 is for GPUs (--provider tensorrt), not the cpu provider"),
    (("--provider", "openvino", "--precision", "fp16"), "not the openvino provider"),
    (("--provider", "cpu", "--precision", "bf16"), "bf16 runs on OpenVINO, not --provider cpu: use --provider openvino"),
    (("--provider", "auto", "--precision", "bf16"), "use --provider openvino"),
    (("--provider", "cpu", "--precision", "int8"), "int8 needs a calibrated int8 graph"),
    (("--provider", "openvino", "--precision", "int8"), "use --precision fp32"),
    (("--provider", "openvino-bf16", "--precision", "fp16"), "means --precision bf16, not fp16"),
    (("--precision", "fp64"), "Unknown precision 'fp64'"),
]


@pytest.mark.parametrize(("flags", "message"), MODEL_REFUSALS, ids=[" ".join(f) for f, _ in MODEL_REFUSALS])
def test_precision_refusals_are_one_line_before_the_image_is_read(tmp_path: Path, flags: tuple, message: str) -> None:
    """The input does not exist: a refusal that named it instead would have come after reading."""
    out = tmp_path / "seg.nii.gz"
    missing = tmp_path / "no_such_ct.nii.gz"
    result = _tsrt("segment", str(missing), "-o", str(out), "--model", str(demo_model_dir()), *flags, home=tmp_path)
    _assert_refused(result, message, out)


@pytest.mark.parametrize("flags", [("--precision", "int8"), ("--provider", "cpu", "--precision", "fp16")])
def test_task_precision_refusals_come_before_the_models_are_checked(ct: Path, tmp_path: Path, flags: tuple) -> None:
    """An empty home: a task run would otherwise fail on its missing models."""
    out = tmp_path / "out"
    result = _tsrt("segment", str(ct), "-o", str(out), "--offline", *flags, home=tmp_path / "empty_home")
    _assert_refused(result, "--precision", out)


@pytest.mark.skipif(NATIVE_BF16, reason=HAS_NATIVE)
@pytest.mark.parametrize("flags", [("--provider", "openvino", "--precision", "bf16"), ("--provider", "openvino-bf16",)])
def test_bf16_without_native_bf16_is_refused(ct: Path, tmp_path: Path, flags: tuple) -> None:
    out = tmp_path / "seg.nii.gz"
    result = _tsrt("segment", str(ct), "-o", str(out), "--model", str(demo_model_dir()), *flags, home=tmp_path)
    assert "deprecated" not in result.stderr or flags[-1] == "openvino-bf16"
    lines = [line for line in result.stderr.strip().splitlines() if "deprecated" not in line]
    assert result.returncode != 0 and len(lines) == 1 and "no native bfloat16" in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_NATIVE)
def test_openvino_bf16_spelling_equals_openvino_with_precision_bf16(ct: Path, tmp_path: Path) -> None:
    """Both spellings run OpenVINO in bf16 on the demo model, record bf16, and give the same labels."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")
    runs = {}
    for name, flags in {"new": ("--provider", "openvino", "--precision", "bf16"), "old": ("--provider", "openvino-bf16")}.items():
        out = tmp_path / f"{name}.nii.gz"
        result = _tsrt("segment", str(ct), "-o", str(out), "--model", str(demo_model_dir()), "-q", *flags, home=tmp_path)
        assert result.returncode == 0, result.stderr
        manifest = json.loads((tmp_path / f"{name}.tsrt.json").read_text())
        runs[name] = (result.stderr, manifest, np.asarray(nib.load(out).dataobj))
    (new_err, new_manifest, new_labels), (old_err, old_manifest, old_labels) = runs["new"], runs["old"]
    assert "deprecated" not in new_err
    deprecation = [line for line in old_err.splitlines() if "deprecated" in line]
    assert len(deprecation) == 1 and "--provider openvino --precision bf16" in deprecation[0], old_err
    for manifest in (new_manifest, old_manifest):
        assert (manifest["provider"], manifest["precision"]) == ("openvino", "bf16")
        assert manifest["request"]["options"]["precision"] == "bf16"
    assert new_manifest["request"] == old_manifest["request"]
    np.testing.assert_array_equal(new_labels, old_labels)


def test_default_precision_is_fp32_in_the_manifest(ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    result = _tsrt("segment", str(ct), "-o", str(out), "--model", str(demo_model_dir()), "-q", "--provider", "cpu",
                   home=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "seg.tsrt.json").read_text())
    assert (manifest["provider"], manifest["precision"], manifest["request"]["options"]["precision"]) == ("cpu", "fp32", "fp32")
