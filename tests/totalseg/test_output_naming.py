"""tsrt writes the files TotalSegmentator 2.18 writes, for every form of `-o` and the side-file options.

One table (FORMS) lists TotalSegmentator calls as python-API keywords; each runs twice on the same
small CT (or its DICOM series) and fixture weights: by official TotalSegmentator (one background
process for all forms, see tests/totalseg_official.py) and by `tsrt segment` with the same call as
command-line flags (`cli_args`, derived from the keywords). Each form writes into its own empty
folder; the two folders must hold the same files (relative names), and each NIfTI file the same
dtype, shape, affine and label-table extension; each DICOM file the same kind (SEG / RTSTRUCT);
each JSON file the same keys.

TotalSegmentator's preview needs an X server (fury + Xvfb): in the official process it is replaced
by a stub that writes the PNG where TotalSegmentator asks (tsrt draws its own). Radiomics features
are stubbed on both sides (PyRadiomics takes ~20 s here; tests/outputs/test_radiomics.py compares
them): the file's place and keys are compared. DICOM SEG written into an existing folder is named
after its new random SeriesInstanceUID: such names compare as `<uid>.dcm`. tsrt's run manifest
(tsrt.outputs.manifest) is its one extra file and is left out.

`expected` in the table is what TotalSegmentator wrote (asserted too), so the table documents its naming.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from totalseg_official import start_official, tsrt_cli, write_dicom_series
from tsrt.outputs import radiomics_features

pytestmark = pytest.mark.slow

#: TotalSegmentator task keys of tsrt_export.fixtures the forms need (total_fastest: the roi_subset crop model).
HOME_TASKS = ("body_fast", "total_fast", "total_fastest")
IMPORTS = (("body", "--fast"), ("total", "--fast"), ("total", "--fastest"))
#: example_ct_sm (3 mm) cropped: body --fast runs at 6 mm on 40x35x15 voxels.
CROP = np.s_[20:100, 15:85, :]

BODY = {"task": "body", "fast": True}
TOTAL = {"task": "total", "fast": True}


@dataclass(frozen=True)
class Form:
    """One TotalSegmentator call: keywords of `totalsegmentator()`; paths relative to the form's folder."""

    keywords: dict
    dicom: bool = False  # input: the DICOM series of the crop instead of the NIfTI file
    folders: tuple[str, ...] = ()  # created before the run (an -o that is an existing folder)
    expected: frozenset[str] = field(default_factory=frozenset)  # what TotalSegmentator writes, documented here

    def official_keywords(self, folder: Path) -> dict:
        """The keywords with paths made absolute (as upstream's command line makes them)."""
        return {
            key: str(folder / value) if key in _PATH_KEYWORDS and isinstance(value, str) else value
            for key, value in self.keywords.items()
        }

    def cli_args(self, folder: Path) -> list[str]:
        """The same call as `tsrt segment` flags (TotalSegmentator's argparse spellings)."""
        args = ["-o", str(folder / self.keywords["output"])]
        for key, value in self.keywords.items():
            if key == "output" or value is False:
                continue
            flag = _FLAGS[key]
            if value is True:
                args.append(flag)
            elif isinstance(value, list):
                args += [flag, *value]
            else:
                args += [flag, str(folder / value) if key in _PATH_KEYWORDS else str(value)]
        return args


_PATH_KEYWORDS = {"output", "statistics", "save_probabilities"}
_FLAGS = {
    "task": "-ta", "fast": "--fast", "ml": "--ml", "statistics": "--statistics", "preview": "--preview",
    "radiomics": "--radiomics", "output_type": "-ot", "save_probabilities": "--save_probabilities",
    "roi_subset": "--roi_subset", "skip_saving": "--skip_saving",
}
_BODY_MASKS = ("body_trunc.nii.gz", "body_extremities.nii.gz", "body.nii.gz", "skin.nii.gz")


def _in(folder: str, *names: str) -> frozenset[str]:
    return frozenset(f"{folder}/{name}" if folder else name for name in names)


FORMS: dict[str, Form] = {
    # Per-class masks in the -o folder (+ body.nii.gz and skin.nii.gz, which task body derives).
    "folder": Form({**BODY, "output": "masks"}, expected=_in("masks", *_BODY_MASKS)),
    # Without --ml a name ending .nii.gz is still a folder of masks.
    "folder_named_like_a_file": Form({**BODY, "output": "seg.nii.gz"}, expected=_in("seg.nii.gz", *_BODY_MASKS)),
    "ml_nii_gz": Form({**BODY, "ml": True, "output": "seg.nii.gz"}, expected=_in("", "seg.nii.gz")),
    "ml_nii": Form({**BODY, "ml": True, "output": "seg.nii"}, expected=_in("", "seg.nii")),
    # No extension: nibabel's save appends .nii (uncompressed); missing folders are created.
    "ml_no_extension": Form({**BODY, "ml": True, "output": "out/seg"}, expected=_in("out", "seg.nii")),
    # An existing folder given with --ml: nibabel writes <folder>.nii next to it.
    "ml_existing_folder": Form(
        {**BODY, "ml": True, "output": "out"}, folders=("out",), expected=_in("", "out.nii")
    ),
    # Side files go into the mask folder, or next to the --ml file.
    "folder_side_files": Form(
        {**BODY, "statistics": True, "preview": True, "output": "masks"},
        expected=_in("masks", *_BODY_MASKS, "statistics.json", "preview_body.png"),
    ),
    "ml_side_files": Form(
        {**TOTAL, "ml": True, "statistics": True, "preview": True, "output": "out/seg"},
        expected=_in("out", "seg.nii", "statistics.json", "preview_total.png"),
    ),
    # --statistics PATH (TotalSegmentator 2.18): statistics.json goes there instead.
    "statistics_path": Form(
        {**BODY, "ml": True, "statistics": "stats.json", "output": "seg.nii.gz"},
        expected=_in("", "seg.nii.gz", "stats.json"),
    ),
    "radiomics": Form(
        {**BODY, "radiomics": True, "output": "masks"}, expected=_in("masks", *_BODY_MASKS, "statistics_radiomics.json")
    ),
    # nnU-Net's probabilities: PATH and PATH with .pkl.
    "probabilities": Form(
        {**BODY, "ml": True, "save_probabilities": "probs.npz", "output": "seg.nii.gz"},
        expected=_in("", "seg.nii.gz", "probs.npz", "probs.pkl"),
    ),
    # Only the roi_subset's masks.
    "roi_subset": Form(
        {**TOTAL, "roi_subset": ["liver", "spleen"], "output": "masks"},
        expected=_in("masks", "liver.nii.gz", "spleen.nii.gz"),
    ),
    # --skip_saving: no masks, the statistics still go where they would.
    "skip_saving": Form(
        {**BODY, "skip_saving": True, "statistics": True, "output": "masks"}, expected=_in("masks", "statistics.json")
    ),
    # DICOM SEG: OUTPUT itself, whatever its ending; in an existing folder <SeriesInstanceUID>.dcm.
    "dicom_seg": Form(
        {**BODY, "output_type": "dicom_seg", "output": "seg.dcm"}, dicom=True, expected=_in("", "seg.dcm")
    ),
    "dicom_seg_no_extension": Form(
        {**BODY, "output_type": "dicom_seg", "output": "seg"}, dicom=True, expected=_in("", "seg")
    ),
    "dicom_seg_existing_folder": Form(
        {**BODY, "output_type": "dicom_seg", "statistics": True, "output": "out"}, dicom=True, folders=("out",),
        expected=_in("", "out/<uid>.dcm", "statistics.json"),
    ),
    # RTSTRUCT: .dcm appended when missing; side files next to it.
    "dicom_rtstruct": Form(
        {**BODY, "output_type": "dicom_rtstruct", "statistics": True, "preview": True, "output": "rt"}, dicom=True,
        expected=_in("", "rt.dcm", "statistics.json", "preview_body.png"),
    ),
    # Several types: <name up to the first dot>.nii.gz, _seg.dcm, _rtstruct.dcm next to OUTPUT ...
    "several_types": Form(
        {**BODY, "output_type": ["nifti", "dicom_seg", "dicom_rtstruct"], "output": "out/case.nii.gz"}, dicom=True,
        expected=_in("out", "case.nii.gz", "case_seg.dcm", "case_rtstruct.dcm"),
    ),
    # ... or <task>_segmentation.* inside an existing folder, with statistics.json in that folder's parent.
    "several_types_existing_folder": Form(
        {**BODY, "output_type": ["nifti", "dicom_seg"], "statistics": True, "output": "out"}, dicom=True,
        folders=("out",), expected=_in("", "out/body_segmentation.nii.gz", "out/body_segmentation_seg.dcm",
                                         "statistics.json"),
    ),
    # DICOM input, NIfTI masks: the same names as for a NIfTI input.
    "dicom_input_masks": Form({**BODY, "output": "masks"}, dicom=True, expected=_in("masks", *_BODY_MASKS)),
}


# --------------------------------------------------------------------------------------------- official

_OFFICIAL_RUNNER = """
def main():
    import time, types

    jobs = json.loads(Path(sys.argv[1]).read_text())

    def stub_preview(ct_in, file_out, *args, **kwargs):  # fury needs an X server: record where the PNG goes
        Path(file_out).parent.mkdir(parents=True, exist_ok=True)  # as upstream's plot_subject does
        Path(file_out).write_bytes(b"\\x89PNG\\r\\n\\x1a\\n")

    sys.modules["totalsegmentator.preview"] = types.SimpleNamespace(generate_preview=stub_preview)
    import totalsegmentator.python_api as api

    def stub_radiomics(ct_file, mask_dir, file_out):  # statistics_radiomics.json's place, keyed as upstream
        masks = sorted(Path(mask_dir).glob("*.nii.gz"))
        Path(file_out).write_text(json.dumps({p.name.split(".")[0]: {} for p in masks}))

    api.get_radiomics_features_for_entire_dir = stub_radiomics
    sequential_nnunet()
    statuses = {}
    for name, job in jobs.items():
        started = time.perf_counter()
        for key in ("input", "output", "save_probabilities"):  # Paths, as upstream's command line passes them
            if key in job:
                job[key] = Path(job[key])
        try:
            api.totalsegmentator(device="cpu", quiet=True, nr_thr_saving=1, **job)
            statuses[name] = "ok"
        except Exception:
            statuses[name] = traceback.format_exc()
        print(f"official {name}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return statuses
"""


@pytest.fixture(scope="module")
def ts_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("totalsegmentator", reason="needs official TotalSegmentator (dev environment)")
    from tsrt_export.fixtures import write_totalseg_home

    return write_totalseg_home(tmp_path_factory.mktemp("ts_home"), HOME_TASKS, small=True)


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """{dicom?: input}: the cropped CT as NIfTI and as a DICOM series."""
    folder = tmp_path_factory.mktemp("inputs")
    nifti = folder / "ct.nii.gz"
    nib.save(nib.load(shared_data / "example_ct_sm.nii.gz").slicer[CROP], nifti)
    return {False: nifti, True: write_dicom_series(nifti, folder / "dicom")}


def _prepare(root: Path) -> dict[str, Path]:
    """An empty folder per form (with the folders the form expects to exist)."""
    folders = {}
    for name, form in FORMS.items():
        folders[name] = root / name
        folders[name].mkdir(parents=True)
        for existing in form.folders:
            (folders[name] / existing).mkdir(parents=True)
    return folders


@pytest.fixture(scope="module")
def official(ts_home: Path, inputs: dict[bool, Path], tmp_path_factory: pytest.TempPathFactory):
    """Official TotalSegmentator on every form, started now in one background process."""
    work = tmp_path_factory.mktemp("official")
    folders = _prepare(work / "forms")
    jobs = {
        name: {"input": str(inputs[form.dicom]), **form.official_keywords(folders[name])}
        for name, form in FORMS.items()
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_OFFICIAL_RUNNER, work, str(work / "jobs.json"), home=ts_home)
    yield process, folders
    process.kill()


@pytest.fixture(scope="module")
def tsrt_runs(
    official, ts_home: Path, inputs: dict[bool, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, object]]:
    """`tsrt segment` on every form (while the official process runs): (folder, result)."""
    home = tmp_path_factory.mktemp("tsrt_home")
    for task, *flags in IMPORTS:
        result = tsrt_cli("models", "import", task, *flags, "--totalseg-home", str(ts_home), "-q", home=home)
        assert result.exit_code == 0, (result.output, result.exception)
    folders = _prepare(tmp_path_factory.mktemp("tsrt") / "forms")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(radiomics_features, "radiomics_for_masks", _radiomics_stub)
        for name, form in FORMS.items():
            started = time.perf_counter()
            args = ("-i", str(inputs[form.dicom]), *form.cli_args(folders[name]), "-q", "-d", "cpu")
            runs[name] = (folders[name], tsrt_cli(*args, home=home))
            print(f"tsrt {name}: {time.perf_counter() - started:.1f}s")
    return runs


def _radiomics_stub(image_path: Path, masks: list[Path], *, progress: bool = False) -> dict[str, dict]:
    """No features (PyRadiomics takes ~20 s here; tests/outputs/test_radiomics.py compares them): only the keys."""
    return {radiomics_features.mask_name(mask): {} for mask in masks}


# --------------------------------------------------------------------------------------------- comparison

_UID_NAME = re.compile(r"(^|/)[0-9.]+\.dcm$")


def written_files(folder: Path) -> dict[str, Path]:
    """Relative name -> path of every file under `folder` (DICOM SEG named by a random UID as <uid>.dcm).

    tsrt's run manifest (tsrt.outputs.manifest: tsrt_manifest.json, NAME.tsrt.json) is its one addition.
    """
    from tsrt.outputs.manifest import FILE_MANIFEST_SUFFIX, FOLDER_MANIFEST

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == FOLDER_MANIFEST or path.name.endswith(FILE_MANIFEST_SUFFIX):
            continue
        relative = path.relative_to(folder).as_posix()
        files[_UID_NAME.sub(r"\1<uid>.dcm", relative)] = path
    return files


class AlmostEqual:
    """An affine that compares equal to one within 1e-4 mm (float noise of the two writers)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AlmostEqual) and np.allclose(self.array, other.array, atol=1e-4)

    def __repr__(self) -> str:
        return repr(self.array.round(4).tolist())


def describe(path: Path) -> object:
    """What must be equal between the two sides' files of one name."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        image = nib.load(path)
        return {
            "dtype": str(image.get_data_dtype()), "shape": image.shape, "affine": AlmostEqual(image.affine),
            "extensions": [extension.get_code() for extension in image.header.extensions],
            "compressed": path.read_bytes()[:2] == b"\x1f\x8b",
        }
    if name.endswith(".json"):
        return sorted(json.loads(path.read_text()))
    if name.endswith(".npz"):
        with np.load(path) as archive:
            return {key: (archive[key].shape, str(archive[key].dtype)) for key in archive.files}
    if name.endswith(".png"):
        return path.read_bytes()[:8]
    if name.endswith(".pkl"):
        return "pickle"
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return {"modality": dataset.Modality, "sop_class": str(dataset.SOPClassUID)}


@pytest.mark.parametrize("form", list(FORMS))
def test_tsrt_writes_the_files_totalsegmentator_writes(form: str, official, tsrt_runs) -> None:
    process, official_folders = official
    status = process.result().get(form)
    assert status == "ok", f"official TotalSegmentator failed on {form}:\n{status}"
    theirs = written_files(official_folders[form])
    assert set(theirs) == FORMS[form].expected, "the table documents what TotalSegmentator writes"
    folder, result = tsrt_runs[form]
    assert result.exit_code == 0, (result.output, result.exception)
    ours = written_files(folder)
    assert sorted(ours) == sorted(theirs)
    for name, path in theirs.items():
        assert describe(ours[name]) == describe(path), name
