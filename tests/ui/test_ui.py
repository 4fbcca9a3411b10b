"""The clinical web UI (tsrt/ui): its numpy/file helpers, and the whole page driven by Streamlit's AppTest.

AppTest runs tsrt/ui/app.py in this process like a browser session would (real uploads, real
segmentation with the bundled demo model on a small phantom, real files), without a browser;
tests/test_ui_browser.py does the same once in Chromium.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.errors import InputError
from tsrt.demo.phantom import make_phantom
from tsrt.outputs.preview import VIEW_AXES, blend_overlay, orthogonal_slice, to_ras
from tsrt.pipeline.label_table import label_colours

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tsrt" / "ui" / "app.py"
#: A small field of view of the demo phantom at the demo model's 3 mm: few tiles, organs still inside.
PHANTOM = dict(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=7)
RUN_TIMEOUT = 300  # seconds for one AppTest run that segments (the machine is shared)


def _phantom_bytes(tmp_path: Path) -> bytes:
    phantom = make_phantom(**PHANTOM)
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), path)
    return path.read_bytes()


# --------------------------------------------------------------------------------------------- slices


def test_views_are_in_radiological_convention():
    """Patient right on the image's left (axial, coronal), anterior/superior at the top, sagittal anterior left."""
    volume = np.zeros((10, 12, 14), dtype=np.int16)  # RAS: x to the patient's right, y anterior, z superior
    volume[9, 6, 7] = 1  # far right
    volume[5, 11, 7] = 2  # most anterior
    volume[5, 6, 13] = 3  # most superior
    spacing = (1.0, 1.0, 1.0)
    axial = orthogonal_slice(volume, spacing, "axial", 7, 1.0)
    assert axial.shape == (12, 10)
    assert tuple(np.argwhere(axial == 1)[0]) == (12 - 1 - 6, 0)  # right -> first column
    assert tuple(np.argwhere(axial == 2)[0]) == (0, 10 - 1 - 5)  # anterior -> first row
    coronal = orthogonal_slice(volume, spacing, "coronal", 6, 1.0)
    assert np.argwhere(coronal == 1)[0][1] == 0 and np.argwhere(coronal == 3)[0][0] == 0
    sagittal = orthogonal_slice(volume, spacing, "sagittal", 5, 1.0)
    assert np.argwhere(sagittal == 2)[0][1] == 0 and np.argwhere(sagittal == 3)[0][0] == 0


def test_views_of_a_flipped_file_match_after_reorientation():
    """An LPS-stored volume shows the same pictures as its RAS twin (orientation comes from the affine)."""
    rng = np.random.default_rng(0)
    ras = rng.integers(0, 5, size=(8, 9, 10)).astype(np.int16)
    lps_array = ras[::-1, ::-1, :]
    lps_affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    reoriented, spacing = to_ras(lps_array, lps_affine)
    np.testing.assert_array_equal(reoriented, ras)
    assert tuple(spacing) == (2.0, 2.0, 3.0)
    assert orthogonal_slice(reoriented, spacing, "coronal", 4, 2.0).shape == (15, 8)  # z stretched to 2 mm pixels


def test_overlay_colours_only_the_visible_structures():
    grey = np.full((4, 4), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 1, 2]] * 4, dtype=np.uint8)
    colours = label_colours(2)
    shown = blend_overlay(grey, labels, colours, 0.5, visible={2})
    assert (shown[:, 1] == 100).all(), "label 1 is hidden"
    assert not (shown[:, 3] == 100).all(), "label 2 is coloured"
    assert (blend_overlay(grey, labels, colours, 0.5, visible=()) == 100).all()


def test_slice_viewer_centres_on_the_anatomy_and_windows():
    from tsrt.ui.slices import WINDOW_PRESETS, SliceViewer

    phantom = make_phantom(**PHANTOM)
    labels = np.zeros_like(phantom.labels)
    labels[60:70, 10:20, 40:50] = 3
    ras = np.diag([*phantom.spacing, 1.0])  # RAS voxels: the viewer's slice indices are the array's own
    viewer = SliceViewer.from_volume(phantom.image, labels, ras, n_labels=8)
    centre = viewer.centre()
    assert 60 <= centre["sagittal"] < 70 and 10 <= centre["coronal"] < 20 and 40 <= centre["axial"] < 50
    bone = viewer.render("axial", centre["axial"], WINDOW_PRESETS["Bone"], visible=())
    soft = viewer.render("axial", centre["axial"], WINDOW_PRESETS["Soft tissue"], visible=())
    assert bone.shape == soft.shape and max(bone.shape[:2]) >= 384 and not np.array_equal(bone, soft)
    level, width = viewer.window_for("Auto")
    assert phantom.image.min() <= level - width / 2 < level + width / 2 <= phantom.image.max()


# --------------------------------------------------------------------------------------------- uploads


def test_uploads_are_checked_by_name_size_and_content(tmp_path: Path):
    from tsrt.ui.uploads import check_upload, save_upload

    with pytest.raises(InputError, match="not a NIfTI file"):
        check_upload("report.pdf", 1000, 10_000)
    with pytest.raises(InputError, match="more than this workstation accepts"):
        check_upload("ct.nii.gz", 20_000, 10_000)
    with pytest.raises(InputError, match="empty"):
        check_upload("ct.zip", 0, 10_000)
    with pytest.raises(InputError, match="named like a NIfTI image"):
        save_upload("ct.nii.gz", 9, io.BytesIO(b"%PDF-1.7\n"), tmp_path, 10_000)
    with pytest.raises(InputError, match="named like a zip archive"):
        save_upload("series.zip", 9, io.BytesIO(b"\x1f\x8b\x08rest"), tmp_path, 10_000)
    data = _phantom_bytes(tmp_path)
    (tmp_path / "in").mkdir()
    saved = save_upload("../../etc/my scan.nii.gz", len(data), io.BytesIO(data), tmp_path / "in", 10**8)
    assert saved == tmp_path / "in" / "my_scan.nii.gz" and saved.read_bytes() == data


def test_session_folder_is_removed_when_closed_or_forgotten(tmp_path: Path):
    from tsrt.ui.uploads import SessionFolder

    closed = SessionFolder(tmp_path)
    (closed.new_folder("upload") / "ct.nii.gz").write_bytes(b"x")
    closed.close()
    assert not closed.path.exists()
    forgotten = SessionFolder(tmp_path)
    path = forgotten.path
    (forgotten.new_folder("result") / "seg.nii.gz").write_bytes(b"x")
    del forgotten  # Streamlit dropping a closed session's state
    gc.collect()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_image_folder_lists_nifti_zips_and_dicom_folders(tmp_path: Path):
    from tsrt.ui.uploads import find_images

    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nii").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    (tmp_path / "patient" / "series").mkdir(parents=True)
    (tmp_path / "patient" / "series" / "1.dcm").write_bytes(b"x")
    (tmp_path / "patient" / "study.zip").write_bytes(b"x")
    (tmp_path / "scanner" / "0001").mkdir(parents=True)
    (tmp_path / "scanner" / "0001" / "IM00001").write_bytes(bytes(128) + b"DICM" + b"rest")  # no file ending
    (tmp_path / "scanner" / "other").mkdir()
    (tmp_path / "scanner" / "other" / "IM00001").write_bytes(bytes(200))
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.nii.gz", "b.nii", "patient/series", "patient/study.zip", "scanner/0001"]


# --------------------------------------------------------------------------------------------- report


def test_report_measures_each_structure_and_says_which_are_cut_off():
    from tsrt.pipeline.read import Image
    from tsrt.ui.results import (
        STATUS_AT_EDGE, STATUS_COMPLETE, STATUS_NOT_FOUND, labels_touching_border, report_csv, structure_report,
    )
    from tsrt.ui.runner import Segmentation

    values = np.arange(20 * 20 * 20, dtype=np.int16).reshape(20, 20, 20) % 300 - 100
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[5:10, 5:10, 5:10] = 1  # inside
    labels[0:4, 10:12, 10:12] = 2  # touches the edge
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    image = Image(values, affine, None, "test")
    names = {1: "liver", 2: "spleen", 3: "aorta"}
    segmentation = Segmentation(image, values, labels, names, "demo", "CT", "cpu")
    report = structure_report(segmentation)
    assert report["structure"] == ["liver", "spleen", "aorta"]
    voxel_ml = 2.0 * 1.5 * 3.0 / 1000
    assert report["volume (ml)"] == [round(125 * voxel_ml, 2), round(16 * voxel_ml, 2), 0.0]
    assert report["mean HU"][0] == pytest.approx(values[labels == 1].mean(), abs=0.05)
    assert report["mean HU"][2] is None
    assert report["status"] == [STATUS_COMPLETE, STATUS_AT_EDGE, STATUS_NOT_FOUND]
    assert labels_touching_border(labels) == {2}
    rows = list(csv.reader(io.StringIO(report_csv(report).decode("utf-8"))))
    assert rows[0] == list(report) and rows[3][3] == "" and rows[1][0] == "liver"


def test_structure_subset_keeps_only_the_chosen_labels():
    from tsrt.ui.runner import keep_structures

    labels = np.array([0, 1, 2, 3, 2], dtype=np.uint8)
    kept, names = keep_structures(labels, {1: "liver", 2: "spleen", 3: "aorta"}, ["spleen", "aorta"])
    assert names == {2: "spleen", 3: "aorta"}
    assert kept.tolist() == [0, 0, 2, 3, 2] and labels.tolist() == [0, 1, 2, 3, 2]


# --------------------------------------------------------------------------------------------- defaults


def _choice(key: str, modality: str = "CT", modes: tuple[str, ...] = ("normal", "fast")):
    from tsrt.ui.runner import ModelChoice

    return ModelChoice(key, key, modality, modes, True)


def test_default_model_is_the_best_installed_task_for_the_modality():
    from tsrt.ui.runner import DEMO_KEY, default_choice

    demo = _choice(DEMO_KEY, modes=("normal",))
    total, body, total_mr, body_mr, face = (_choice("total"), _choice("body"), _choice("total_mr", "MR"),
                                            _choice("body_mr", "MR"), _choice("face"))
    everything = [total, body, total_mr, body_mr, face, demo]
    assert default_choice(everything, "CT") is total and default_choice(everything, None) is total, "CT when unknown"
    assert default_choice(everything, "MR") is total_mr
    assert default_choice([body, face, body_mr, demo], "CT") is body and default_choice([face, demo], "CT") is face
    assert default_choice([body_mr, total_mr, demo], "MR") is total_mr
    assert default_choice([total_mr, demo], "CT") is total_mr, "another modality's task before the phantom demo"
    assert default_choice([demo], "MR") is demo, "the demo only when no task is installed"


def test_fast_is_preselected_without_a_gpu_or_when_it_is_the_only_mode():
    from tsrt.ui.runner import default_fast

    both, fast_only, normal_only = _choice("total"), _choice("total", modes=("fast",)), _choice("x", modes=("normal",))
    assert default_fast(both, ["auto", "cpu"]) and default_fast(both, ["auto", "cpu", "openvino"])
    assert not default_fast(both, ["auto", "cuda", "cpu"]) and not default_fast(both, ["auto", "tensorrt", "cpu"])
    assert default_fast(fast_only, ["auto", "cuda", "cpu"])
    assert not default_fast(normal_only, ["auto", "cpu"]), "fast cannot be ticked when it is not installed"


def test_model_menu_lists_tasks_first_and_the_demo_last_as_phantom_only(tmp_path: Path):
    from tsrt.ui.runner import DEMO_KEY, model_choices

    choices = model_choices(tmp_path / "empty")
    assert [c.key for c in choices] == [DEMO_KEY]
    assert choices[0].label == "Demo (trained on phantoms, not for patients)"


def test_scan_modality_and_whether_the_demo_fits(tmp_path: Path):
    from tsrt.totalseg.source import read_source
    from tsrt.ui.runner import demo_fits, scan_modality

    phantom = make_phantom(**PHANTOM)
    scans = {
        "phantom": nib.Nifti1Image(phantom.image, phantom.affine),
        "other_seed": nib.Nifti1Image(make_phantom(shape=(64, 48, 40), spacing=(4.0, 4.5, 5.0), seed=3).image,
                                      make_phantom(shape=(64, 48, 40), spacing=(4.0, 4.5, 5.0)).affine),
        "moved": nib.Nifti1Image(phantom.image, np.diag([-3.0, 3.0, 3.0, 1.0])),  # a real scan's geometry
        "other_content": nib.Nifti1Image(np.flip(phantom.image, 2).copy(), phantom.affine),  # lungs at the feet
        "mr": nib.Nifti1Image(np.clip(phantom.image, 0, None).astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])),
    }
    sources = {}
    for name, image in scans.items():
        nib.save(image, tmp_path / f"{name}.nii.gz")
        sources[name] = read_source(tmp_path / f"{name}.nii.gz")
    assert {name: demo_fits(source) for name, source in sources.items()} == {
        "phantom": True, "other_seed": True, "moved": False, "other_content": False, "mr": False,
    }
    assert {name: scan_modality(source) for name, source in sources.items()} == {
        "phantom": "CT", "other_seed": "CT", "moved": "CT", "other_content": "CT", "mr": "MR",
    }


# --------------------------------------------------------------------------------------------- the page


@pytest.fixture()
def page_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model store (only the demo model is offered) and uploads under tmp_path."""
    monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TSRT_UI_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.delenv("TSRT_UI_DATA_DIR", raising=False)
    monkeypatch.delenv("TSRT_UI_MAX_UPLOAD_MB", raising=False)
    return tmp_path


def _page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _image_urls(at) -> list[str]:
    return [element.value[0] for element in at.image]


def test_page_states_that_nothing_leaves_the_machine(page_env: Path):
    at = _page()
    assert "never leave it" in at.caption[0].value and "no usage statistics" in at.caption[0].value
    assert at.button(key="run").disabled, "nothing to segment before a scan is open"
    assert at.selectbox(key="model").options == ["Demo (trained on phantoms, not for patients)"]


def test_upload_segment_review_and_download_the_demo(page_env: Path):
    at = _page()
    data = _phantom_bytes(page_env)
    at.file_uploader(key="upload").upload("phantom.nii.gz", data, "application/gzip")
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert "96 x 80 x 64 voxels of 3.00 x 3.00 x 3.00 mm" in at.markdown[0].value
    assert not at.warning, "the demo model on its own phantom: no warning"
    uploaded = list((page_env / "sessions").rglob("phantom.nii.gz"))
    assert len(uploaded) == 1 and uploaded[0].read_bytes() == data, "the upload lives in the session's temp folder"

    at.button(key="run").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception and not at.error, (at.exception, at.error)
    stages = [bar.text for bar in at.progress]
    assert [bar.value for bar in at.progress] == [100] * len(stages)
    assert stages[0].startswith("Loading the model") and stages[1].startswith("Segmenting")
    assert len(at.image) == 4, "three slice views and the overview"

    result = at.session_state["result"]
    written = np.asarray(nib.load(result.files.multilabel).dataobj)
    table = at.dataframe[0].value
    spacing = PHANTOM["spacing"]
    for name, label, volume in zip(table["structure"], table["label"], table["volume (ml)"]):
        assert volume == pytest.approx(int((written == label).sum()) * np.prod(spacing) / 1000, abs=0.01), name
    found = {name for name, volume in zip(table["structure"], table["volume (ml)"]) if volume > 0}
    assert {"liver", "spine", "aorta"} <= found, f"the demo model finds the large organs: {found}"

    # The CSV offered for download is the table; the masks zip holds one mask per structure of the label file.
    rows = list(csv.DictReader(io.StringIO(result.files.report.read_text())))
    assert [row["structure"] for row in rows] == list(table["structure"])
    with zipfile.ZipFile(result.files.masks_zip()) as archive:
        names = sorted(archive.namelist())
        assert names == sorted([*(f"segmentations/{name}.nii.gz" for name in table["structure"]),
                                "segmentations/tsrt_manifest.json"])
        assert archive.read("segmentations/tsrt_manifest.json") == result.files.manifest.read_bytes()
        liver_label = int(table["label"][list(table["structure"]).index("liver")])
        archive.extract("segmentations/liver.nii.gz", page_env / "unzipped")
    liver = np.asarray(nib.load(page_env / "unzipped" / "segmentations" / "liver.nii.gz").dataobj)
    np.testing.assert_array_equal(liver, written == liver_label)
    assert [button.label for button in at.download_button] == [
        "Report (CSV)", "Label file (NIfTI, all structures)", "Masks (zip, one NIfTI per structure)",
        "Run manifest (JSON: model, options, checksums)",
    ]
    # The run manifest beside the label file: the bundled demo model, the uploaded bytes, the files offered.
    manifest = json.loads(result.files.manifest.read_text())
    assert result.files.manifest.name == "phantom_segmentation.tsrt.json"
    assert manifest["request"]["kind"] == "model" and manifest["request"]["name"].startswith("Dataset900_TsrtDemo/")
    assert manifest["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["outputs"] == sorted(p.name for p in (result.files.multilabel, result.files.overview,
                                                          result.files.report))
    assert manifest["provider"] == result.files.segmentation.provider and manifest["precision"] == "fp32"

    # Overlay toggles: hiding a structure changes the slices, showing it again restores them exactly.
    with_all = _image_urls(at)
    at.checkbox(key="show:liver").uncheck().run()
    without_liver = _image_urls(at)
    assert without_liver[:3] != with_all[:3] and without_liver[3] == with_all[3], "slices change, overview does not"
    at.checkbox(key="show:liver").check().run()
    assert _image_urls(at) == with_all
    at.toggle(key="overlay").set_value(False).run()
    no_overlay = _image_urls(at)
    for name in found:
        at.checkbox(key=f"show:{name}").uncheck()
    at.toggle(key="overlay").set_value(True).run()
    assert _image_urls(at)[:3] == no_overlay[:3], "every structure unticked is the same as the overlay off"
    at.radio(key="window").set_value("Bone").run()
    assert _image_urls(at)[:3] != no_overlay[:3], "the bone window shows other greys"
    assert not at.exception


def test_structure_subset_runs_and_reports_only_those(page_env: Path):
    at = _page()
    at.file_uploader(key="upload").upload("phantom.nii.gz", _phantom_bytes(page_env), "application/gzip")
    at.run()
    at.multiselect(key="structures:demo").set_value(["liver", "spine"]).run()
    at.button(key="run").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert list(at.dataframe[0].value["structure"]) == ["liver", "spine"]
    written = np.asarray(nib.load(at.session_state["result"].files.multilabel).dataobj)
    assert set(np.unique(written)) <= {0, 4, 8}


def test_bad_uploads_get_one_clear_message(page_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TSRT_UI_MAX_UPLOAD_MB", "1")
    at = _page()
    at.file_uploader(key="upload").upload("scan.nii.gz", b"this is a text file, renamed", "application/gzip")
    at.run()
    assert not at.exception
    assert "named like a NIfTI image but its content is not one" in at.error[0].value
    assert at.button(key="run").disabled
    at.file_uploader(key="upload").set_value(("big.nii.gz", b"\x1f\x8b" + bytes(2 * 1024 * 1024), "application/gzip"))
    at.run()
    assert not at.exception
    assert "more than this workstation accepts for uploads (1.0 MB)" in at.error[0].value


def test_a_zipped_dicom_series_opens_with_its_modality(page_env: Path, shared_data: Path):
    series = shared_data / "example_ct_dicom"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(series.iterdir()):
            zipped.write(file, f"series/{file.name}")
    at = _page()
    at.file_uploader(key="upload").upload("study.zip", archive.getvalue(), "application/zip")
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert "**study.zip**: 512 x 512 x 20 voxels of 0.98 x 0.98 x 2.00 mm, CT" in at.markdown[0].value
    assert not at.button(key="run").disabled
    assert "trained on tsrt's synthetic phantoms only" in at.warning[0].value, "the demo on a real scan warns"


def test_scans_can_be_opened_from_the_configured_folder(page_env: Path, monkeypatch: pytest.MonkeyPatch):
    folder = page_env / "scans"
    (folder / "2026").mkdir(parents=True)
    (folder / "2026" / "case_01.nii.gz").write_bytes(_phantom_bytes(page_env))
    monkeypatch.setenv("TSRT_UI_DATA_DIR", str(folder))
    at = _page()
    at.radio(key="source").set_value("Image folder").run()
    picker = at.selectbox(key="folder_image")
    assert picker.options == ["2026/case_01.nii.gz"]
    picker.set_value(folder / "2026" / "case_01.nii.gz").run()
    assert not at.exception and not at.error
    assert "**case_01.nii.gz**: 96 x 80 x 64 voxels" in at.markdown[0].value
    assert not list((page_env / "sessions").rglob("*.nii.gz")), "files from the folder are read in place, not copied"


# --------------------------------------------------------------------------------------------- installed tasks


@pytest.fixture(scope="module")
def body_task_home(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSRT_HOME with TotalSegmentator's `body --fast` model (the session's small seeded net) in its store."""
    from tsrt.models.registry import get_task
    from tsrt_export.import_totalseg import import_task

    home = tmp_path_factory.mktemp("body_task_home")
    import_task(get_task("body", fast=True), totalseg_home, store_root=home / "models", progress=False)
    return home


def test_installed_tasks_are_offered_and_run(page_env: Path, body_task_home: Path, monkeypatch: pytest.MonkeyPatch):
    from tsrt.ui.runner import model_choices

    monkeypatch.setenv("TSRT_HOME", str(body_task_home))
    choices = model_choices(body_task_home / "models")
    assert [(c.key, c.modes) for c in choices] == [("body", ("fast",)), ("demo", ("normal",))], "the demo last"
    at = _page()
    assert at.selectbox(key="model").value == choices[0], "the installed task, not the demo, is preselected"
    at.file_uploader(key="upload").upload("phantom.nii.gz", _phantom_bytes(page_env), "application/gzip")
    at.run()
    assert at.selectbox(key="model").value == choices[0]
    assert at.checkbox(key="fast:body").value and at.checkbox(key="fast:body").disabled, "only --fast is installed"
    at.selectbox(key="model").set_value(choices[1]).run()
    assert not at.warning, "the demo on its phantom: no warning"
    at.selectbox(key="model").set_value(choices[0]).run()
    assert at.selectbox(key="model").value == choices[0], "the clinician's choice stands"
    assert at.multiselect(key="structures:body").options == ["body_extremities", "body_trunc"]
    at.multiselect(key="structures:body").set_value(["body_trunc"]).run()
    at.button(key="run").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [bar.text.split(":")[0] for bar in at.progress][:2] == ["Checking the installed models", "Segmenting"]
    assert list(at.dataframe[0].value["structure"]) == ["body_trunc"]
    assert "body --fast on cpu" in at.caption[1].value


# --------------------------------------------------------------------------------------------- command


def test_tsrt_ui_starts_streamlit_locally_without_telemetry(tmp_path: Path):
    from typer.testing import CliRunner

    from tsrt.cli.root import app
    from tsrt.cli.ui import APP_PATH, streamlit_command

    command = streamlit_command("127.0.0.1", 8765, 512)
    options = dict(zip(command[5::2], command[6::2]))
    assert command[3:5] == ["run", str(APP_PATH)] and APP_PATH.is_file()
    assert options["--browser.gatherUsageStats"] == "false"
    assert options["--server.address"] == "127.0.0.1" and options["--browser.serverAddress"] == "127.0.0.1"
    assert options["--server.maxUploadSize"] == "512"
    result = CliRunner().invoke(app, ["ui", "--data-dir", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "is not a folder" in str(result.exception)
    help_text = CliRunner().invoke(app, ["ui", "--help"], env={"COLUMNS": "200"}).output
    assert "--data-dir" in help_text and "--max-upload-mb" in help_text


def test_save_memory_runs_in_slabs_and_segments_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """The page's "Save memory" box (`--low-memory`) reaches the model: slabs run, the labels do not change."""
    import logging

    monkeypatch.setenv("TSRT_HOME", str(tmp_path / "home"))
    from tsrt.totalseg.source import read_source
    from tsrt.ui.runner import DEMO_KEY, model_choices, segment_for_ui

    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(_phantom_bytes(tmp_path))
    source = read_source(scan)
    demo = next(choice for choice in model_choices(tmp_path / "no-store") if choice.key == DEMO_KEY)
    whole = segment_for_ui(source, demo, provider="cpu")
    with caplog.at_level(logging.INFO, logger="tsrt"):
        saving = segment_for_ui(source, demo, provider="cpu", low_memory=True)
    assert any("run in slabs" in record.message for record in caplog.records)
    assert whole.label_names == saving.label_names and len(whole.label_names) > 3
    np.testing.assert_array_equal(saving.labels, whole.labels)
