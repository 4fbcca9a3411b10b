"""The runtime-only install: `pip install .` in a fresh venv has no torch and still segments.

This is what a hospital workstation or an edge box gets. It builds a real venv (pip takes the
wheels from its cache or the package index), so it is slower than a unit test, and it is the
only proof that nothing in the runtime pulls torch in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, f"pip install . failed:\n{result.stdout}\n{result.stderr}"
    return venv


def _run(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, **kwargs)


def test_runtime_install_has_no_torch(runtime_venv):
    python = str(runtime_venv / "bin" / "python")
    for forbidden in ("torch", "nnunetv2", "totalsegmentator"):
        probe = _run(runtime_venv, python, "-c", f"import {forbidden}")
        assert probe.returncode != 0, f"{forbidden} is importable in the runtime-only venv"
        assert "ModuleNotFoundError" in probe.stderr


def test_runtime_cli_help_works(runtime_venv):
    result = _run(runtime_venv, str(runtime_venv / "bin" / "tsrt"), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_runtime_imports_every_runtime_module(runtime_venv):
    """Every module of the runtime package imports without the export toolchain installed."""
    python = str(runtime_venv / "bin" / "python")
    code = (
        "import importlib, pkgutil, tsrt\n"
        "names = [m.name for m in pkgutil.iter_modules(tsrt.__path__, 'tsrt.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "import sys; bad = [m for m in ('torch', 'nnunetv2', 'totalsegmentator') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(len(names))\n"
    )
    result = _run(runtime_venv, python, "-c", code, cwd="/")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 8


def test_runtime_install_segments_an_image(runtime_venv, tiny_result_folder, tmp_path):
    """A full segmentation in the torch-free venv, on a graph exported by the dev toolchain."""
    import nibabel as nib
    import numpy as np

    from tsrt.demo.phantom import make_phantom
    from tsrt_export.onnx_export import export_model

    model = tmp_path / "model"
    export_model(tiny_result_folder, model, progress=False)
    phantom = make_phantom(shape=(48, 40, 32), spacing=(3.0, 3.0, 3.0))
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), source)
    output = tmp_path / "seg.nii.gz"
    result = _run(
        runtime_venv, str(runtime_venv / "bin" / "tsrt"), "segment", str(source), "-o", str(output),
        "--model", str(model), "--no-tta", "-q", cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    labels = np.asarray(nib.load(output).dataobj)
    assert labels.shape == phantom.image.shape
    assert len(np.unique(labels)) > 1, "the tiny model's seeded weights give more than one label"
    probe = _run(runtime_venv, str(runtime_venv / "bin" / "python"), "-c", "import torch")
    assert probe.returncode != 0


def test_runtime_ui_without_the_extra_says_what_to_install(runtime_venv):
    """`tsrt ui` needs Streamlit (the ui extra); without it: one line naming the install command."""
    result = _run(runtime_venv, str(runtime_venv / "bin" / "tsrt"), "ui")
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "tsrt: error: `tsrt ui` needs Streamlit, which is not installed: pip install 'tsrt[ui]'."
    )
