"""The model store, `tsrt models import` and `tsrt models download`.

The source is a real TotalSegmentator home (tsrt_export.fixtures.write_totalseg_home, the `total_fast`
task: one small Dataset297 model). Downloads come from a real HTTP server on 127.0.0.1 that serves
that home's result folder zipped like TotalSegmentator's release zips, a truncated copy, a 404, a
connection that breaks mid-way (then serves the rest on a Range request) and a license server that
accepts one key and rejects another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import WeightsServer
from typer.testing import CliRunner

from tsrt.models import store
from tsrt.models.download import DownloadError, LicenseError, download_model_zip, fetch, set_license_key
from tsrt.errors import ModelError, TsrtError
from tsrt.models.registry import get_model, get_task

pytest.importorskip("nnunetv2", reason="the fixture TotalSegmentator home needs the export extra")

from tsrt.cli.models import models_app  # noqa: E402

FAST = get_task("total", fast=True)
MODEL = FAST.parts[0]  # Dataset297_TotalSegmentator_total_3mm_1559subj
LICENSED = get_model("Dataset301_heart_highres_1559subj")
GOOD_KEY = "aca_GOODKEY0000000"
BAD_KEY = "aca_BADKEY00000000"
runner = CliRunner()


# --------------------------------------------------------------------------------------------
# Fixtures: a TotalSegmentator home, its release zip, an HTTP server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def totalseg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tsrt_export.fixtures import write_totalseg_home

    return write_totalseg_home(tmp_path_factory.mktemp("ts_home"), tasks=("total_fast",), small=True)


@pytest.fixture(scope="module")
def release_zip(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The result folder zipped as TotalSegmentator's release zips are: DatasetNNN_name/ at the top."""
    base = tmp_path_factory.mktemp("zip") / MODEL.name
    archive = shutil.make_archive(str(base), "zip", root_dir=totalseg_home / "nnunet" / "results", base_dir=MODEL.name)
    return Path(archive).read_bytes()


@pytest.fixture(scope="module")
def server(release_zip: bytes) -> Iterator[WeightsServer]:
    running = WeightsServer(release_zip, license_key=GOOD_KEY)
    yield running
    running.close()


@pytest.fixture
def tsrt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh TSRT_HOME, and no TotalSegmentator config to fall back on."""
    home = tmp_path / "tsrt_home"
    monkeypatch.setenv("TSRT_HOME", str(home))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "no_totalseg_home"))
    monkeypatch.delenv("TSRT_WEIGHTS_URL", raising=False)
    monkeypatch.delenv("TSRT_LICENSE_URL", raising=False)
    return home


@pytest.fixture(scope="module")
def imported_home(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSRT_HOME after `tsrt models import total --fast` (done once; later tests copy, never change it)."""
    home = tmp_path_factory.mktemp("imported_tsrt_home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TSRT_HOME", str(home))
        result = runner.invoke(models_app, ["import", "total", "--fast", "--totalseg-home", str(totalseg_home), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    return home


@pytest.fixture(scope="module")
def imported_model(imported_home: Path) -> Path:
    return imported_home / "models" / MODEL.name


def _store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------
# tsrt models import
# --------------------------------------------------------------------------------------------


def test_import_exports_into_the_store_and_second_import_skips(
    imported_home: Path, totalseg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSRT_HOME", str(imported_home))
    status = store.model_status(MODEL)
    assert status.complete and status.folds == ("0",) and status.path == imported_home / "models" / MODEL.name
    assert sorted(p.name for p in status.path.iterdir()) == [
        ".verified.json", "fold_0.onnx", "fold_0.plan.json", "fold_0.verify.json"
    ]
    assert store.model_status(MODEL, verify=True).complete
    stamps = {p.name: p.stat().st_mtime_ns for p in status.path.iterdir()}

    again = runner.invoke(models_app, ["import", "total", "--fast", "--totalseg-home", str(totalseg_home)])
    assert again.exit_code == 0, again.output
    assert "already in the store" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in status.path.iterdir()} == stamps
    assert [p.name for p in (imported_home / "models").iterdir()] == [MODEL.name]  # no staging leftovers

    listing = runner.invoke(models_app, ["list"])
    assert listing.exit_code == 0, listing.output
    total_row = next(line for line in listing.output.splitlines() if line.strip("│ ").startswith("total "))
    assert "✓" in total_row
    per_model = runner.invoke(models_app, ["list", "--models", "--verify"])
    assert per_model.exit_code == 0 and "complete" in per_model.output and "Dataset297" in per_model.output


def test_import_refuses_a_half_present_model(totalseg_home: Path, tsrt_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "half"
    shutil.copytree(totalseg_home, home)
    (home / "nnunet" / "results" / MODEL.result_folder / "fold_0" / "checkpoint_final.pth").unlink()
    result = runner.invoke(models_app, ["import", "total", "--fast", "--totalseg-home", str(home)])
    assert isinstance(result.exception, ModelError)
    message = str(result.exception)
    assert "\n" not in message and "fold_0/checkpoint_final.pth" in message and "download it again" in message
    assert _store_files(tsrt_home / "models") == []


def test_import_of_a_task_missing_from_the_home_names_the_model(totalseg_home: Path, tsrt_home: Path) -> None:
    result = runner.invoke(models_app, ["import", "total", "--fastest", "--totalseg-home", str(totalseg_home)])
    assert isinstance(result.exception, ModelError)
    assert "Dataset298_TotalSegmentator_total_6mm_1559subj" in str(result.exception)
    result = runner.invoke(models_app, ["import", "total", "--fast", "--totalseg-home", str(tsrt_home / "nothing")])
    assert isinstance(result.exception, ModelError) and "not a TotalSegmentator home" in str(result.exception)


def test_import_needs_no_torch_but_verify_with_torch_needs_the_export_extra(
    totalseg_home: Path, tmp_path: Path
) -> None:
    code = f"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoTorch())
from typer.testing import CliRunner
from tsrt.cli.models import models_app
for extra in (['--verify-with-torch'], []):
    args = ['import', 'total', '--fast', '--totalseg-home', {str(totalseg_home)!r}, '-q', *extra]
    result = CliRunner().invoke(models_app, args)
    print(type(result.exception).__name__, '|', result.exception)
"""
    env = {**os.environ, "TSRT_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    with_torch, without = done.stdout.strip().split("\n")
    assert with_torch.startswith("TsrtError |") and "pip install 'tsrt[export]'" in with_torch
    assert without == "NoneType | None"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TSRT_HOME", str(tmp_path / "home"))
        assert store.model_status(MODEL, verify=True).complete


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _copy_model(imported_model: Path, root: Path) -> Path:
    target = root / MODEL.name
    shutil.copytree(imported_model, target)
    return target


def test_status_of_missing_and_tampered_models(imported_model: Path, tmp_path: Path) -> None:
    assert store.model_status(MODEL, tmp_path).state == "missing"
    folder = _copy_model(imported_model, tmp_path)
    status = store.model_status(MODEL, tmp_path)
    assert status.complete and status.size_bytes == store.directory_size(folder) > 0

    graph = folder / "fold_0.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    broken = store.model_status(MODEL, tmp_path)
    assert broken.state == "incomplete" and "sha256" in broken.problems[0]

    graph.unlink()
    assert "no graph" in store.model_status(MODEL, tmp_path).problems[0]
    (folder / "fold_0.plan.json").unlink()
    assert store.model_status(MODEL, tmp_path).problems == ("fold 0 has no plan",)


def test_verify_rehashes_even_when_the_install_record_looks_current(imported_model: Path, tmp_path: Path) -> None:
    folder = _copy_model(imported_model, tmp_path)
    graph = folder / "fold_0.onnx"
    record = json.loads((folder / store.VERIFIED_FILE).read_text())
    record["fold_0.onnx"].update(size=graph.stat().st_size, mtime_ns=graph.stat().st_mtime_ns)
    (folder / store.VERIFIED_FILE).write_text(json.dumps(record))
    assert store.model_status(MODEL, tmp_path).complete
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    times = (graph.stat().st_atime_ns, graph.stat().st_mtime_ns)
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=times)  # same size and mtime: only re-hashing notices
    assert store.model_status(MODEL, tmp_path).complete
    assert store.model_status(MODEL, tmp_path, verify=True).state == "incomplete"


def test_status_rejects_a_model_exported_from_another_result_folder(imported_model: Path, tmp_path: Path) -> None:
    body = get_model("Dataset299_body_1559subj")  # nnUNetTrainer, not nnUNetTrainer_4000epochs_NoMirroring
    shutil.copytree(imported_model, tmp_path / body.name)
    status = store.model_status(body, tmp_path)
    assert status.state == "incomplete"
    assert "was exported from nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres" in status.problems[0]


def test_install_replaces_an_incomplete_copy_and_refuses_an_incomplete_export(
    imported_model: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    stale = _copy_model(imported_model, root)
    (stale / "fold_0.onnx").unlink()
    with store.staging(root) as staging:
        staged = _copy_model(imported_model, staging)
        status = store.install(staged, MODEL, root)
    assert status.complete and sorted(p.name for p in root.iterdir()) == [MODEL.name]

    with store.staging(root) as staging:
        broken = _copy_model(imported_model, staging)
        (broken / "fold_0.plan.json").unlink()
        with pytest.raises(ModelError, match="incomplete"):
            store.install(broken, MODEL, root)
    assert store.model_status(MODEL, root, verify=True).complete
    assert sorted(p.name for p in root.iterdir()) == [MODEL.name]


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


def test_download_resumes_after_a_broken_connection_then_imports(
    server: WeightsServer, release_zip: bytes, tsrt_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSRT_WEIGHTS_URL", f"{server.url}/flaky")
    server.flaky_broken = False
    first = runner.invoke(models_app, ["download", "total", "--fast", "-q"])
    assert isinstance(first.exception, DownloadError), first.output
    assert "resume" in str(first.exception)
    part = tsrt_home / "downloads" / f"{MODEL.name}.zip.part"
    assert part.stat().st_size == len(release_zip) // 3
    assert store.model_status(MODEL).state == "missing"

    second = runner.invoke(models_app, ["download", "total", "--fast", "-q"])
    assert second.exit_code == 0, (second.output, second.exception)
    last = [r for r in server.requests if r[1].startswith("/flaky/")][-1]
    assert last[1] == f"/flaky/v2.0.0-weights/{MODEL.name}.zip"
    assert last[2].get("Range") == f"bytes={len(release_zip) // 3}-"
    assert store.model_status(MODEL, verify=True).complete
    assert sorted(p.name for p in (tsrt_home / "downloads").iterdir()) == []  # zip and scratch folder removed


def test_download_of_a_truncated_zip_leaves_nothing_behind(server: WeightsServer, tsrt_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("TSRT_WEIGHTS_URL", f"{server.url}/truncated")
    result = runner.invoke(models_app, ["download", "total", "--fast", "-q"])
    assert isinstance(result.exception, DownloadError)
    assert "not a complete zip archive" in str(result.exception) and "run the command again" in str(result.exception)
    assert list((tsrt_home / "downloads").iterdir()) == []
    assert _store_files(tsrt_home / "models") == []


def _damaged(release_zip: bytes) -> bytes:
    """The zip with one byte of a checkpoint's stored data flipped: the archive opens, a member fails its CRC."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(release_zip)) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(release_zip)
    data[start + member.compress_size // 2] ^= 0xFF
    return bytes(data)


@pytest.fixture
def left_zip(server: WeightsServer, tsrt_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where an earlier `tsrt models download` left the zip (the test writes it), served from /good."""
    monkeypatch.setenv("TSRT_WEIGHTS_URL", f"{server.url}/good")
    left = tsrt_home / "downloads" / f"{MODEL.name}.zip"
    left.parent.mkdir(parents=True)
    return left


def test_a_corrupt_zip_left_on_disk_is_deleted_and_fetched_again(
    server: WeightsServer, release_zip: bytes, tsrt_home: Path, left_zip: Path
) -> None:
    from tsrt.models.download import zip_problem

    left = left_zip
    left.write_bytes(_damaged(release_zip))
    assert "CRC" in zip_problem(left) or "not a readable zip" in zip_problem(left)
    asked = len(server.requests)
    result = runner.invoke(models_app, ["download", "total", "--fast", "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert [r[1] for r in server.requests[asked:]] == [f"/good/v2.0.0-weights/{MODEL.name}.zip"]
    assert store.model_status(MODEL, verify=True).complete
    assert list((tsrt_home / "downloads").iterdir()) == []


def test_an_intact_zip_on_disk_is_reused_and_a_recorded_sha256_is_checked(
    server: WeightsServer, release_zip: bytes, left_zip: Path
) -> None:
    import dataclasses
    import hashlib
    import zipfile

    from tsrt.models.download import zip_problem

    left = left_zip
    left.write_bytes(release_zip)
    asked = len(server.requests)
    assert download_model_zip(MODEL, progress=False) == left
    assert len(server.requests) == asked, "an intact zip is not downloaded again"

    # A valid zip that is not the release models.toml records: its sha256 gives it away.
    with_sha = dataclasses.replace(MODEL, zip_sha256=hashlib.sha256(release_zip).hexdigest())
    with zipfile.ZipFile(left, "w") as archive:
        archive.writestr(f"{MODEL.name}/other.txt", "a valid zip, but not the release")
    assert zip_problem(left) is None and zip_problem(left, with_sha.zip_sha256) is not None
    assert download_model_zip(with_sha, progress=False).read_bytes() == release_zip
    assert [r[1] for r in server.requests[asked:]] == [f"/good/v2.0.0-weights/{MODEL.name}.zip"]
    assert download_model_zip(with_sha, progress=False) == left  # now it matches: reused
    assert len(server.requests) == asked + 1


def test_download_404_names_the_override(server: WeightsServer, tsrt_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("TSRT_WEIGHTS_URL", f"{server.url}/missing")
    result = runner.invoke(models_app, ["download", "total", "--fast", "-q"])
    assert isinstance(result.exception, DownloadError)
    assert "404" in str(result.exception) and "TSRT_WEIGHTS_URL" in str(result.exception)
    assert not (tsrt_home / "downloads" / f"{MODEL.name}.zip.part").exists()


def test_fetch_checks_sha256_and_announced_length(server: WeightsServer, release_zip: bytes, tmp_path: Path) -> None:
    import hashlib

    url = f"{server.url}/good/x.zip"
    good = fetch(url, tmp_path / "a.zip", expected_sha256=hashlib.sha256(release_zip).hexdigest(), progress=True)
    assert good.read_bytes() == release_zip
    with pytest.raises(DownloadError, match="sha256"):
        fetch(url, tmp_path / "b.zip", expected_sha256="0" * 64, progress=False)
    assert not (tmp_path / "b.zip").exists() and not (tmp_path / "b.zip.part").exists()
    # A stale partial file longer than the file: the server answers 416, the download starts over.
    (tmp_path / "c.zip.part").write_bytes(b"x" * (len(release_zip) + 10))
    assert fetch(url, tmp_path / "c.zip", progress=False).read_bytes() == release_zip


def test_unreachable_server_is_one_actionable_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="Cannot reach .*check the network"):
        fetch(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", progress=False)


# --------------------------------------------------------------------------------------------
# License
# --------------------------------------------------------------------------------------------


def test_set_license_validates_with_the_server_and_stores_privately(
    server: WeightsServer, tsrt_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSRT_LICENSE_URL", f"{server.url}/license")
    with pytest.raises(LicenseError, match="start with 'aca_'"):
        set_license_key("abc_123")
    result = runner.invoke(models_app, ["set-license", BAD_KEY])
    assert isinstance(result.exception, LicenseError) and "does not accept" in str(result.exception)
    assert not (tsrt_home / "config.json").exists()

    result = runner.invoke(models_app, ["set-license", GOOD_KEY])
    assert result.exit_code == 0, result.output
    config = tsrt_home / "config.json"
    assert json.loads(config.read_text()) == {"license_number": GOOD_KEY}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert ("POST", "/license/is_valid_license_number", {"license_number": GOOD_KEY}) in server.requests


def test_licensed_download_asks_the_license_server(
    server: WeightsServer, release_zip: bytes, tsrt_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSRT_LICENSE_URL", f"{server.url}/license")
    with pytest.raises(LicenseError, match="set-license"):
        download_model_zip(LICENSED, progress=False)

    set_license_key(BAD_KEY, validate=False)
    with pytest.raises(LicenseError, match="rejected"):
        download_model_zip(LICENSED, progress=False)
    assert not list((tsrt_home / "downloads").glob("*.zip"))

    set_license_key(GOOD_KEY)
    archive = download_model_zip(LICENSED, progress=False)
    assert archive.read_bytes() == release_zip
    from tsrt.models.registry import load_registry

    expected = {"license_number": GOOD_KEY, "task": "heartchambers_highres",
                "version": load_registry().totalsegmentator_version}
    assert ("POST", "/license/download_weights", expected) in server.requests


def test_license_key_falls_back_to_totalsegmentators_config(tsrt_home: Path, tmp_path: Path, monkeypatch) -> None:
    from tsrt.models.download import read_license_key

    assert read_license_key() is None
    ts_home = tmp_path / "ts"
    ts_home.mkdir()
    (ts_home / "config.json").write_text(json.dumps({"totalseg_id": "x", "license_number": GOOD_KEY}))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(ts_home))
    assert read_license_key() == GOOD_KEY
