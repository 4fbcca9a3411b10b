"""Models on first use (issue 18): a run that needs a model the store lacks fetches it before reading any image.

From the TotalSegmentator home when it holds the model (the session's fixture home as TOTALSEG_HOME_DIR),
else downloaded from the release URL (a real HTTP server on 127.0.0.1, conftest.WeightsServer, serving that
home's model zipped as TotalSegmentator's release zips are) and imported torch-free. With `--offline` or
TSRT_OFFLINE=1 the run stops with the one-line error of before and installs nothing. No mocks: the real
CLI, importer, downloader and store.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, WeightsServer
from typer.testing import CliRunner, Result

from tsrt.models import store
from tsrt.models.registry import get_task

CT = SHARED_DATA / "example_ct_sm.nii.gz"
MODEL = get_task("total", fast=True).parts[0]  # Dataset297, the one model of `total --fast`
SEGMENT = ("-i", str(CT), "--ml", "--fast")
#: Nothing listens here: a run that tried to download instead of importing from the home would fail.
NO_SERVER = "http://127.0.0.1:9"

pytestmark = pytest.mark.skipif(not CT.is_file(), reason=f"needs {CT} (../shared/data)")


def _tsrt(*args: str, env: dict[str, str | None]) -> Result:
    """`tsrt ARGS` in this process (TotalSegmentator's spelling: no subcommand), with `env` set (None: unset)."""
    from tsrt.cli.root import app, totalsegmentator_argv

    return CliRunner().invoke(app, totalsegmentator_argv(list(args)), env={"TSRT_OFFLINE": None, **env})


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _env(tsrt_home: Path, totalseg_home: Path, weights_url: str = NO_SERVER) -> dict[str, str | None]:
    return {
        "TSRT_HOME": str(tsrt_home), "TOTALSEG_HOME_DIR": str(totalseg_home), "TSRT_WEIGHTS_URL": weights_url,
        "TSRT_LICENSE_URL": NO_SERVER,
    }


@pytest.fixture(scope="module")
def reference(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The labels of a run from a store where `total --fast` was imported beforehand (`tsrt models import`)."""
    from tsrt.cli.models import models_app

    folder = tmp_path_factory.mktemp("pre_imported")
    env = _env(folder / "tsrt_home", totalseg_home)
    imported = CliRunner().invoke(
        models_app, ["import", "total", "--fast", "--totalseg-home", str(totalseg_home), "-q"], env=env
    )
    assert imported.exit_code == 0, (imported.output, imported.exception)
    result = _tsrt(*SEGMENT, "-o", str(folder / "out.nii.gz"), "-q", env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return _labels(folder / "out.nii.gz")


@pytest.fixture(scope="module")
def server(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeightsServer]:
    """The home's Dataset297 zipped like a release zip (DatasetNNN_name/ at the top), served on loopback."""
    base = tmp_path_factory.mktemp("release") / MODEL.name
    archive = shutil.make_archive(str(base), "zip", root_dir=totalseg_home / "nnunet" / "results", base_dir=MODEL.name)
    running = WeightsServer(Path(archive).read_bytes())
    yield running
    running.close()


def test_a_missing_model_is_imported_from_the_totalsegmentator_home_on_first_use(
    totalseg_home: Path, reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsrt")
    env = _env(tmp_path / "tsrt_home", totalseg_home)
    result = _tsrt(*SEGMENT, "-o", str(tmp_path / "out.nii.gz"), env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"importing {MODEL.name} from the TotalSegmentator home {totalseg_home}" in caplog.text
    assert store.model_status(MODEL, tmp_path / "tsrt_home" / "models", verify=True).complete
    np.testing.assert_array_equal(_labels(tmp_path / "out.nii.gz"), reference)


@pytest.mark.parametrize("how", ["--offline", "TSRT_OFFLINE=1"])
def test_offline_keeps_the_one_line_error_and_installs_nothing(totalseg_home: Path, tmp_path: Path, how: str) -> None:
    """Through the real entry point: the one-line message, a non-zero exit, no output, an untouched store."""
    env = {**os.environ, **_env(tmp_path / "tsrt_home", totalseg_home), "PYTHONUTF8": "1"}
    args = [*SEGMENT, "-o", str(tmp_path / "out.nii.gz")]
    if how == "--offline":
        args.append("--offline")
    else:
        env["TSRT_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True,
        env=env, cwd=REPO_ROOT,
    )
    assert done.returncode != 0
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"needs models that are not in the store ({MODEL.name})" in message
    assert "tsrt models import total --fast" in message
    assert not (tmp_path / "out.nii.gz").exists()
    assert not any((tmp_path / "tsrt_home").rglob("*.onnx"))


def test_without_a_home_the_model_is_downloaded_once_checksummed_and_imported(
    server: WeightsServer, reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsrt")
    home = tmp_path / "tsrt_home"
    env = _env(home, tmp_path / "no_totalseg_home", weights_url=f"{server.url}/good")
    before = len(server.requests)
    first = _tsrt(*SEGMENT, "-o", str(tmp_path / "first.nii.gz"), env=env)
    assert first.exit_code == 0, (first.output, first.exception)
    url = f"{server.url}/good/{MODEL.release}/{MODEL.name}.zip"
    assert [request[:2] for request in server.requests[before:]] == [("GET", url.removeprefix(server.url))]
    assert f"downloading {MODEL.name} from {url}" in caplog.text
    assert store.model_status(MODEL, home / "models", verify=True).complete  # graph sha256s as recorded on import
    assert list((home / "downloads").iterdir()) == []  # the zip and its unpacked copy are gone
    np.testing.assert_array_equal(_labels(tmp_path / "first.nii.gz"), reference)

    second = _tsrt(*SEGMENT, "-o", str(tmp_path / "second.nii.gz"), "-q", env=env)
    assert second.exit_code == 0, (second.output, second.exception)
    assert len(server.requests) == before + 1  # nothing downloaded the second time
    np.testing.assert_array_equal(_labels(tmp_path / "second.nii.gz"), reference)


def test_a_cohort_fetches_once_before_its_first_case(
    totalseg_home: Path, reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsrt")
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        (cases / f"{name}.nii.gz").symlink_to(CT)
    result = _tsrt("-i", str(cases), "-o", str(tmp_path / "out"), "--ml", "--fast", "-q", env=_env(
        tmp_path / "tsrt_home", totalseg_home
    ))
    assert result.exit_code == 0, (result.output, result.exception)
    assert caplog.text.count("First use: importing") == 1
    for name in ("a", "b"):
        np.testing.assert_array_equal(_labels(tmp_path / "out" / name / f"{name}.nii.gz"), reference)
