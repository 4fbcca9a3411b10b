"""The runtime-only install: `pip install .` in a fresh venv has no torch, still exports, imports and segments.

This is what a hospital workstation or an edge box gets: it converts nnU-Net and TotalSegmentator
checkpoints itself (restricted reader, torch-free graph builder) and its masks equal the dev venv's.
It builds a real venv (pip takes the wheels from its cache or the package index), so it is slower
than a unit test, and it is the only proof that nothing in the runtime pulls torch in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # setuptools packs whatever build/lib holds, so a module moved away since the last build would ship too.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, f"pip install . failed:\n{result.stdout}\n{result.stderr}"
    return venv


def _run(venv: Path, *args: str, env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env.update(env_extra or {})
    # Outside the repository: from its root, `python -c` would import the source tree's tsrt (and its egg-info).
    kwargs.setdefault("cwd", venv.parent)
    return subprocess.run(list(args), capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, **kwargs)


def test_runtime_install_has_no_torch(runtime_venv):
    python = str(runtime_venv / "bin" / "python")
    for forbidden in ("torch", "nnunetv2", "totalsegmentator"):
        probe = _run(runtime_venv, python, "-c", f"import {forbidden}")
        assert probe.returncode != 0, f"{forbidden} is importable in the runtime-only venv"
        assert "ModuleNotFoundError" in probe.stderr


def test_runtime_install_carries_no_torch_toolchain_or_test_fixtures(runtime_venv):
    """The wheel is tsrt alone: the torch exporter and the fixture generator are the separate export/ package."""
    python = str(runtime_venv / "bin" / "python")
    probe = _run(runtime_venv, python, "-c", "import tsrt_export")
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, "tsrt_export ships in the runtime wheel"
    listing = _run(runtime_venv, python, "-c", "import importlib.metadata as m; print('\\n'.join(str(f) for f in m.files('tsrt')))")
    files = listing.stdout.split()
    assert files and not [f for f in files if "fixture" in f or f.startswith("tsrt_export")], files
    sources = [f for f in files if f.endswith(".py")]
    torch_import = re.compile(r"^\s*(?:import|from)\s+torch\b", re.M)
    site = (runtime_venv / "lib").joinpath(*_site_packages_parts(runtime_venv))
    torch_code = [f for f in sources if torch_import.search((site / f).read_text())]
    assert torch_code == []


def _site_packages_parts(venv: Path) -> tuple[str, ...]:
    return next(p.relative_to(venv / "lib").parts for p in (venv / "lib").glob("python3*/site-packages"))


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


def _phantom_ct(path: Path, seed: int = 0) -> Path:
    import nibabel as nib

    from tsrt.demo.phantom import make_phantom

    phantom = make_phantom(shape=(48, 40, 32), spacing=(3.0, 3.0, 3.0), seed=seed, vary=seed != 0)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), path)
    return path


def _labels(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(path).dataobj)


def test_runtime_install_exports_imports_and_segments_like_the_dev_venv(
    runtime_venv, tiny_result_folder, totalseg_home, tmp_path
):
    """Without torch: `tsrt export` an nnU-Net result folder and `tsrt models import` a TotalSegmentator home
    (both made by the fixtures), then segment with the imported task.

    The exported graph gives the dev venv's torch export's logits, and the masks equal the dev venv's
    (tests/models/test_torch_free_import.py shows that the dev venv's import equals the torch exporter's).
    """
    import numpy as np
    import onnxruntime as ort
    from typer.testing import CliRunner

    from tsrt.cli.root import app, totalsegmentator_argv
    from tsrt.models.exporter import random_verification_input
    from tsrt.models.registry import get_task
    from tsrt.models.totalseg_import import import_task
    from tsrt_export.onnx_export import export_model

    source = _phantom_ct(tmp_path / "ct.nii.gz")
    tsrt = str(runtime_venv / "bin" / "tsrt")
    steps = [
        [tsrt, "export", str(tiny_result_folder), str(tmp_path / "model")],
        [tsrt, "models", "import", "total", "--fast", "--totalseg-home", str(totalseg_home), "-q"],
        [tsrt, "-i", str(source), "-o", str(tmp_path / "runtime_seg.nii.gz"), "--fast", "--ml", "-q"],
    ]
    for step in steps:
        result = _run(runtime_venv, *step, cwd=str(tmp_path), env_extra={"TSRT_HOME": str(tmp_path / "runtime_home")})
        assert result.returncode == 0, f"{step[1:3]}: {result.stderr}"

    export_model(tiny_result_folder, tmp_path / "torch_model", progress=False, folds=["0"])
    x = random_verification_input(1, (32, 32, 32))
    logits = {}
    for name in ("model", "torch_model"):
        session = ort.InferenceSession(str(tmp_path / name / "fold_0.onnx"), providers=["CPUExecutionProvider"])
        logits[name] = session.run(None, {"input": x})[0]
    np.testing.assert_array_equal(logits["model"], logits["torch_model"])

    dev_home = tmp_path / "dev_home"
    import_task(get_task("total", fast=True), totalseg_home, store_root=dev_home / "models", progress=False)
    argv = totalsegmentator_argv(["-i", str(source), "-o", str(tmp_path / "dev_seg.nii.gz"), "--fast", "--ml", "-q"])
    dev = CliRunner().invoke(app, argv, env={"TSRT_HOME": str(dev_home)})
    assert dev.exit_code == 0, (dev.output, dev.exception)
    runtime_labels, dev_labels = _labels(tmp_path / "runtime_seg.nii.gz"), _labels(tmp_path / "dev_seg.nii.gz")
    assert len(np.unique(dev_labels)) > 1, "the seeded fixture weights give more than one label"
    np.testing.assert_array_equal(runtime_labels, dev_labels)
    probe = _run(runtime_venv, str(runtime_venv / "bin" / "python"), "-c", "import torch")
    assert probe.returncode != 0


def test_runtime_ui_without_the_extra_says_what_to_install(runtime_venv):
    """`tsrt ui` needs Streamlit (the ui extra); without it: one line naming the install command."""
    result = _run(runtime_venv, str(runtime_venv / "bin" / "tsrt"), "ui")
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "tsrt: error: `tsrt ui` needs Streamlit, which is not installed: pip install 'tsrt[ui]'."
    )


def test_runtime_install_quantizes_and_runs_int8(runtime_venv, tmp_path):
    """`tsrt models quantize` (ONNX Runtime's quantization: onnx + onnxruntime only) and `--precision int8` in the
    runtime-only venv. The demo model's gate verdict is not this test's subject, so --force installs it either way."""
    import json
    import shutil

    from tsrt.demo.run import demo_model_dir

    model = tmp_path / "model"
    shutil.copytree(demo_model_dir(), model)
    scans = [_phantom_ct(tmp_path / f"ct{i}.nii.gz", seed=i) for i in range(2)]
    tsrt = str(runtime_venv / "bin" / "tsrt")
    env = {"TSRT_HOME": str(tmp_path / "home")}
    steps = [
        [tsrt, "models", "quantize", str(model), "-c", str(scans[0]), "--validation", str(scans[1]), "--tiles", "2",
         "--force", "-q"],
        [tsrt, "segment", str(scans[1]), "-o", str(tmp_path / "int8.nii.gz"), "--model", str(model), "--precision",
         "int8", "-q"],
    ]
    for step in steps:
        result = _run(runtime_venv, *step, cwd=str(tmp_path), env_extra=env)
        assert result.returncode == 0, f"{step[1:3]}: {result.stderr}"
    assert json.loads((tmp_path / "int8.tsrt.json").read_text())["precision"] == "int8"
    assert json.loads((model / "fold_0.plan.json").read_text())["int8"]["graph_file"] == "fold_0.int8.onnx"
