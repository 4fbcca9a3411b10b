"""`tsrt report spine` against TotalSegmentator's `totalseg_spine_report`, on stacked-box spines of known geometry.

Phantom: T12..L5 as boxes (40.5 x 32 mm, heights 22.5..28.75 mm) separated by 8.75 mm discs, a
2 mm cortex (800 HU) around cancellous bone (200 HU; L3 osteoporotic at 70 HU), L1 with its
anterior 30 % compressed by 5 mm at both endplates (a wedge-like fracture). Box edges lie on voxel
boundaries, so the analytic heights, volumes and (eroded, cortex-free) attenuations are known;
upstream's marching stops at the last voxel centre inside, so a height reads at most one voxel
short. It is stored in LPS with anisotropic voxels, straight and tilted 8 degrees in the sagittal
plane (heights then along a tilted axis).

Parity: tsrt's measurement and official `VertebraeProcessor` + `save_results` (run in a child
process on the same files) give the same JSON, the same chosen slices and centroids. End to end:
`tsrt report spine` on NIfTI and DICOM with fixture models in TotalSegmentator's layout that label
voxels by intensity band (each vertebra its own HU), against official `create_spine_report`
running the same models (its HTML-to-PNG step needs wkhtmltoimage, not on PyPI: replaced by a stub
that records the page's variables).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pictures import decode_png
from totalseg_official import start_official, tsrt_cli, tsrt_process, write_dicom_series

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
#: vertebrae_pp_refined's label numbers (task total's numbering).
LABELS = {"T12": 19, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24}
HEIGHT_VOXELS = {"T12": 18, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 22}
WIDTH_VOXELS, DEPTH_VOXELS, DISC_VOXELS = 45, 40, 7
FRACTURE_LEVEL, FRACTURE_SHARE, FRACTURE_VOXELS = "L1", 0.3, 4  # anterior share of the depth; voxels off each end
CORTEX_MM, CORTEX_HU = 2.0, 800
SPACING = (0.9, 0.8, 1.25)


def make_spine_phantom(
    spacing: tuple[float, float, float] = SPACING, tilt_deg: float = 0.0, hu: dict[str, int] | None = None,
    cortex: bool = True, levels: tuple[str, ...] = LEVELS, margins: tuple[int, int, int] = (21, 30, 24),
    lps: bool = True, heights: dict[str, int] = HEIGHT_VOXELS, disc_voxels: int = DISC_VOXELS,
    fracture_voxels: int = FRACTURE_VOXELS,
) -> dict:
    """CT (int16), vertebrae_pp_refined labels and affine of a stacked-box spine, with its analytic answers."""
    sx, sy, sz = spacing
    hu = hu or {level: 70 if level == "L3" else 200 for level in LEVELS}
    height_mm = {level: heights[level] * sz for level in levels}
    width, depth, disc = WIDTH_VOXELS * sx, DEPTH_VOXELS * sy, disc_voxels * sz
    stack = sum(height_mm.values()) + disc * (len(levels) - 1)
    shape = (WIDTH_VOXELS + 2 * margins[0], DEPTH_VOXELS + 2 * margins[1], int(round(stack / sz)) + 2 * margins[2])
    x, y, z = [(np.arange(n) + 0.5) * s - n * s / 2 for n, s in zip(shape, spacing)]  # box edges on voxel edges
    x, y, z = np.meshgrid(x, y, z, indexing="ij")
    turn = np.deg2rad(tilt_deg)
    y, z = np.cos(turn) * y + np.sin(turn) * z, -np.sin(turn) * y + np.cos(turn) * z
    ct = np.full(shape, 40, np.int16)
    labels = np.zeros(shape, np.uint8)
    expected, top = {}, stack / 2

    def body(bottom: float, top: float, shrink: float) -> np.ndarray:
        inside = (np.abs(x) < width / 2 - shrink) & (np.abs(y) < depth / 2 - shrink)
        inside &= (z >= bottom + shrink) & (z < top - shrink)
        if level == FRACTURE_LEVEL:
            cut = fracture_voxels * sz
            anterior = y >= depth / 2 - FRACTURE_SHARE * depth
            inside &= ~anterior | ((z >= bottom + cut + shrink) & (z < top - cut - shrink))
        return inside

    for level in levels:
        bottom = top - height_mm[level]
        inside = body(bottom, top, 0.0)
        ct[inside] = hu[level]
        if cortex:
            ct[inside & ~body(bottom, top, CORTEX_MM)] = CORTEX_HU
        labels[inside] = LABELS[level]
        anterior = height_mm[level] - (2 * fracture_voxels * sz if level == FRACTURE_LEVEL else 0)
        expected[level] = {
            "height_mm": height_mm[level], "anterior_mm": anterior, "hu": hu[level],
            "volume_ml": float(inside.sum()) * sx * sy * sz / 1000,
        }
        top = bottom - disc
    affine = np.diag([sx, sy, sz, 1.0])
    if lps:  # stored as scanners store it: x and y reversed
        flip = np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        affine, ct, labels = affine @ flip, ct[::-1, ::-1], labels[::-1, ::-1]
    return {"ct": np.ascontiguousarray(ct), "labels": np.ascontiguousarray(labels), "affine": affine,
            "expected": expected, "spacing": spacing}


def label_table() -> dict[int, str]:
    from tsrt.models.registry import get_task

    return dict(get_task("vertebrae_pp_refined").classes)


def save_phantom(phantom: dict, folder: Path, name: str) -> dict[str, str]:
    """The CT and its labels as TotalSegmentator writes them (-ml: the label table in the extension)."""
    from tsrt.pipeline.read import Image
    from tsrt.totalseg.outputs import label_image

    folder.mkdir(parents=True, exist_ok=True)
    ct = nib.Nifti1Image(phantom["ct"], phantom["affine"])
    paths = {"ct": folder / f"{name}_ct.nii.gz", "labels": folder / f"{name}_vertebrae.nii.gz"}
    nib.save(ct, paths["ct"])
    image = Image(phantom["ct"], phantom["affine"], ct.header, name)
    nib.save(label_image(phantom["labels"], image, label_table()), paths["labels"])
    return {k: str(v) for k, v in paths.items()}


def tsrt_report(phantom: dict, spine_range: str = "all", phase: str = "native"):
    """tsrt's report from the phantom's own labels, read back from disk like the official side reads them."""
    from tsrt.reports.spine import measure_report
    from tsrt.totalseg.source import read_source

    source = read_source(nib.Nifti1Image(phantom["ct"], phantom["affine"]))
    return measure_report(source, phantom["labels"], label_table(), spine_range=spine_range, contrast_phase=phase)


# --------------------------------------------------------------------------------------------- measurements

#: (name, tilt in degrees, spine range)
CASES = (("straight", 0.0, "all"), ("tilted", 8.0, "all"), ("straight_lumbar", 0.0, "lumbar"))

_ORACLE = """
def main():
    import nibabel as nib
    from totalsegmentator.nifti_ext_header import load_multilabel_nifti
    from totalsegmentator.spine_report.measure_verte_height import VertebraeProcessor, save_results

    jobs = json.loads(Path(sys.argv[1]).read_text())
    answers = {}
    for name, job in jobs.items():  # what create_spine_report hands get_verte_height, without its pictures
        ct = nib.as_closest_canonical(nib.load(job["ct"]))
        vertebrae, label_map = load_multilabel_nifti(job["labels"])
        vertebrae = nib.as_closest_canonical(vertebrae)
        processor = VertebraeProcessor(ct, vertebrae, label_map, vertebrae, {}, horizontal_mask_type="raw",
                                       spine_range=job["range"])
        info = processor.process_vertebrae()
        out = Path(job["ct"]).with_suffix(".heights.json")
        save_results(info, out)
        answers[name] = {
            "results": json.loads(out.read_text()),
            "slices": {k: int(v["x_slice"]) for k, v in info.items()},
            "centroids": {k: [float(c) for c in v["centroid"]] for k, v in info.items()},
            "lines": {k: {p: [m["height_start"] and [float(c) for c in m["height_start"]],
                              m["height_end"] and [float(c) for c in m["height_end"]]]
                          for p, m in v["height_measurements"].items()} for k, v in info.items()},
        }
    return answers
"""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("spines")
    built = {}
    for name, tilt, spine_range in CASES:
        phantom = make_spine_phantom(tilt_deg=tilt)
        built[name] = {"phantom": phantom, "range": spine_range, **save_phantom(phantom, folder, name)}
    return built


#: A real CT (3 mm) with task total's masks: whole vertebrae, not bodies, and S1 (measured by neither side).
EXAMPLE = {"ct": SHARED_DATA / "example_ct_sm.nii.gz", "labels": SHARED_DATA / "example_seg.nii.gz"}


@pytest.fixture(scope="module")
def official(phantoms: dict, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    work = tmp_path_factory.mktemp("official_spine")
    jobs = {name: {"ct": p["ct"], "labels": p["labels"], "range": p["range"]} for name, p in phantoms.items()}
    if all(path.is_file() for path in EXAMPLE.values()):
        jobs["example"] = {"ct": str(EXAMPLE["ct"]), "labels": str(EXAMPLE["labels"]), "range": "all"}
    (work / "jobs.json").write_text(json.dumps(jobs))
    process = start_official(_ORACLE, work, str(work / "jobs.json"))
    yield process
    process.kill()


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_heights_match_official_and_the_phantom(name: str, phantoms: dict, official) -> None:
    phantom = phantoms[name]["phantom"]
    report = tsrt_report(phantom, phantoms[name]["range"])
    theirs = official.result()[name]
    print(f"{name}: tsrt {report.results}\nofficial {theirs['results']}")
    # the same JSON, key for key (values are rounded alike, so equal)
    assert list(report.results) == list(theirs["results"])
    assert report.results == pytest.approx(theirs["results"], abs=1e-9)
    # the same slices, centroids and line ends
    ours = {v.name: v for v in report.heights.vertebrae}
    assert {k: v.x_slice for k, v in ours.items()} == theirs["slices"]
    for key, centroid in theirs["centroids"].items():
        assert ours[key].centroid == pytest.approx(centroid, abs=1e-9)
        for position, (start, end) in theirs["lines"][key].items():
            line = ours[key].heights[{"15%": "posterior", "50%": "middle", "85%": "anterior"}[position]]
            assert (line.start, line.end) == (pytest.approx(start, abs=1e-9), pytest.approx(end, abs=1e-9))

    # the phantom's analytic answers
    expected = phantom["expected"]
    reported = [level for level in LEVELS if f"vertebrae_{level}_volume_ml" in report.results]
    assert reported == (list(LEVELS[1:]) if phantoms[name]["range"] == "lumbar" else list(LEVELS))
    tilted = name == "tilted"
    tolerance = 1.5 * max(SPACING) if tilted else SPACING[2] + 1e-6  # one voxel short at most (straight)
    for level in reported:
        key, truth = f"vertebrae_{level}", expected[level]
        posterior, middle = report.results[f"{key}_height_posterior_mm"], report.results[f"{key}_height_middle_mm"]
        anterior = report.results[f"{key}_height_anterior_mm"]
        for measured, analytic in ((posterior, truth["height_mm"]), (middle, truth["height_mm"]),
                                   (anterior, truth["anterior_mm"])):
            assert analytic - tolerance <= measured <= analytic + (tolerance if tilted else 0.01), (level, measured)
        # 4 mm erosion leaves only cancellous bone: the attenuation is the phantom's, exactly
        assert report.results[f"{key}_intensity"] == truth["hu"] == report.results[f"{key}_intensity_median"]
        assert report.results[f"{key}_volume_ml"] == round(truth["volume_ml"], 2)
    fracture = report.results[f"vertebrae_{FRACTURE_LEVEL}_height_difference"]
    assert fracture == pytest.approx(1 - expected[FRACTURE_LEVEL]["anterior_mm"] / expected[FRACTURE_LEVEL]["height_mm"],
                                     abs=0.03)
    assert report.results["LWS_max"] == fracture
    assert report.verdict.high_height_difference == (FRACTURE_LEVEL,)
    assert report.verdict.low_intensity == ("L3",)


def test_real_ct_matches_official(shared_data: Path, official) -> None:
    """Only L1 is whole in this small scan: the same heights, attenuation and chosen slice as upstream."""
    from tsrt.pipeline.label_table import read_label_table
    from tsrt.reports.spine import canonical_grid
    from tsrt.reports.spine_heights import measure_spine, results_json
    from tsrt.totalseg.source import read_source

    masks = nib.load(EXAMPLE["labels"])
    source = read_source(EXAMPLE["ct"])
    ct, labels, zooms = canonical_grid(source.values, np.asanyarray(masks.dataobj), source)
    heights = measure_spine(ct, labels, read_label_table(masks), zooms)
    theirs = official.result()["example"]
    assert list(results_json(heights.vertebrae)) == list(theirs["results"])
    assert results_json(heights.vertebrae) == pytest.approx(theirs["results"], abs=1e-9)
    assert {v.name: v.x_slice for v in heights.vertebrae} == theirs["slices"] == {"vertebrae_L1": 57}


def test_morphology_matches_scipy_and_skimage() -> None:
    """The two erosions the report uses, on random masks touching the border, with uneven ellipsoids."""
    ndimage = pytest.importorskip("scipy.ndimage")
    morphology = pytest.importorskip("skimage.morphology")
    from tsrt.totalseg import ops

    rng = np.random.default_rng(7)
    for _ in range(20):
        shape = tuple(int(n) for n in rng.integers(6, 18, 3))
        mask = np.zeros(shape, bool)
        low, high = rng.integers(0, 3, 3), np.array(shape) - rng.integers(0, 3, 3)
        mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = rng.uniform(size=tuple(high - low)) < 0.93
        radii = rng.integers(1, 4, 3)
        with pytest.warns(FutureWarning):  # skimage 0.26 deprecates binary_erosion; upstream still calls it
            box = morphology.binary_erosion(mask, footprint=np.ones(tuple(2 * radii + 1), bool))
        assert np.array_equal(ops.binary_erosion_box(mask, radii), box)
        structure = ops.ellipsoid_structure(np.float32(rng.uniform(0.6, 2.5, 3)), 4)
        assert np.array_equal(ops.binary_erosion_structure(mask, structure),
                              ndimage.binary_erosion(mask, structure=structure))


# --------------------------------------------------------------------------------------------- verdict, files


def test_verdict_follows_upstreams_thresholds() -> None:
    from tsrt.reports.spine import assess

    results = {"vertebrae_L1_intensity": 100.0, "vertebrae_L1_intensity_median": 100.0,
               "vertebrae_L1_height_difference": 0.21, "vertebrae_L2_intensity": 95.0,
               "vertebrae_L2_intensity_median": 95.0, "vertebrae_L2_height_difference": 0.2}
    assert assess(results, "native").low_intensity == ()  # 90.25 HU
    assert assess(results, "portal_venous").low_intensity == ("L1", "L2")  # + 14.75 HU
    # upstream adds 20 HU for "arterial", a name its phase classifier never gives: arterial_* stay native
    assert assess(results, "arterial_late").low_intensity == ()
    assert assess(results, "native").high_height_difference == ("L1",)  # strictly above 0.2
    assert not assess({"LWS_max": None}, "native").has_measurements


def test_metadata_like_upstream() -> None:
    from tsrt.errors import InputError
    from tsrt.reports.spine import report_metadata

    assert report_metadata(None)["PatientAge"] == 99 and report_metadata(None)["version"] == "0.1.0"
    assert report_metadata({"PatientAge": "", "PatientBirthDate": "19600301", "StudyDate": "20250228"})["PatientAge"] == 64
    assert report_metadata({"PatientAge": None})["PatientAge"] == 120  # no dates: upstream's stand-in
    with pytest.raises(InputError, match="PatientAge"):
        report_metadata({"PatientAge": "45M"})


def test_refuses_missing_or_cut_lumbar_vertebrae() -> None:
    from tsrt.reports.common import MissingStructuresError

    without = make_spine_phantom(levels=("T12", "L1", "L2", "L3"))
    with pytest.raises(MissingStructuresError, match=r"needs vertebrae_L4, vertebrae_L5, which the scan does not"):
        tsrt_report(without)
    cut = make_spine_phantom(cortex=False)
    lowest = np.nonzero(cut["labels"] == LABELS["L5"])[2].min() + 3  # the field of view ends inside L5
    cut["ct"], cut["labels"] = cut["ct"][..., lowest:].copy(), cut["labels"][..., lowest:].copy()
    with pytest.raises(MissingStructuresError, match="vertebrae_L5 whole, but the field of view cuts it"):
        tsrt_report(cut)
    assert tsrt_report(cut, spine_range="l1_l4").results["vertebrae_L4_volume_ml"] > 0  # L5 not needed there


def test_report_files(tmp_path: Path) -> None:
    """JSON (upstream's -j), the page as HTML, PNG and RGB NIfTI laid out like upstream's, the overview."""
    from tsrt.reports.spine import write_report
    from tsrt.reports.spine_render import GREEN, RED, YELLOW

    report = tsrt_report(make_spine_phantom(), phase="portal_venous")
    files = write_report(report, tmp_path / "case" / "spine.json")
    assert sorted(p.name for p in (tmp_path / "case").iterdir()) == [
        "spine.html", "spine.json", "spine.nii.gz", "spine.png", "spine_overview.png"]
    document = json.loads(files["json"].read_text())
    assert list(document) == ["results", "metadata"] and document["results"] == report.results
    assert document["metadata"]["version"] == "0.1.0" and document["metadata"]["PatientSex"] == "M"
    overview = decode_png(files["overview"].read_bytes())
    for colour in (GREEN, RED, YELLOW):  # outlines, height lines, the fractured L1's label
        assert np.all(overview == colour, axis=-1).any(), colour
    page = decode_png(files["page"].read_bytes())
    html = files["html"].read_text()
    assert "Lumbar spine compression fracture in:" in html and "portal venous" in html
    assert "data:image/png;base64," in html
    voxels = np.asanyarray(nib.load(files["nifti"]).dataobj)
    assert voxels.dtype.names == ("R", "G", "B") and voxels.shape == (page.shape[1] + 1, page.shape[0] + 1, 1)
    rgb = np.stack([voxels[c][..., 0] for c in "RGB"], axis=-1)
    assert np.array_equal(rgb[1:, :-1].transpose(1, 0, 2), page)  # voxel (x, y) = page column, row, as upstream


def test_page_nifti_matches_upstreams_layout(tmp_path: Path) -> None:
    pytest.importorskip("totalsegmentator", reason="the oracle is official TotalSegmentator (dev environment)")
    from totalsegmentator.reporting import combine_rgb_slices_as_nifti

    from tsrt.outputs.preview import encode_png
    from tsrt.reports.common import rgb_pages_nifti

    page = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    (tmp_path / "page.png").write_bytes(encode_png(page))
    theirs = combine_rgb_slices_as_nifti([tmp_path / "page.png"])
    ours = rgb_pages_nifti([page])
    assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    assert np.array_equal(ours.affine, theirs.affine)


# --------------------------------------------------------------------------------------------- with models

#: End-to-end phantom: L1..L5 in 1.5 mm voxels (the models' spacing: no resampling), every vertebra its
#: own HU so intensity-band fixture models label it; no cortex (a band per vertebra). A band's edges
#: ramp over 10 HU (fixtures.BAND_EDGE at their std of 1000 HU): bands 20 HU wide and adjacent (fewer
#: edges, a smaller first stage), each HU in its band's middle; L3 below the native 90.25 HU threshold.
E2E_SPACING = (1.5, 1.5, 1.5)
E2E_LEVELS = LEVELS[1:]
#: Short bodies and discs (disc > the 3 mm + 3 mm the neighbours' labels grow into it), so the whole
#: image fits one 96-voxel tile of the fixture models.
E2E_HEIGHTS = {"L1": 12, "L2": 13, "L3": 13, "L4": 14, "L5": 13}
E2E_HU = {"L3": 80, "L1": 100, "L2": 120, "L4": 140, "L5": 160}
BANDS = {f"vertebrae_{level}": (hu - 10.0, hu + 10.0) for level, hu in E2E_HU.items()}
BANDS["vertebrae_body"] = (60.0, 180.0)  # the vertebrae_body model: every vertebra, not the discs (40 HU)


@pytest.fixture(scope="module")
def band_homes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A TotalSegmentator home with band models for vertebrae_pp_refined, and a tsrt home importing them."""
    pytest.importorskip("nnunetv2", reason="the fixture models need the export extra")
    from tsrt_export.fixtures import write_totalseg_home

    ts_home = write_totalseg_home(tmp_path_factory.mktemp("spine_ts_home"), ("vertebrae_pp", "vertebrae_body"),
                                  intensity_bands=BANDS)
    home = tmp_path_factory.mktemp("spine_store")
    result = tsrt_cli("models", "import", "vertebrae_pp_refined", "--totalseg-home", str(ts_home), "-q", home=home)
    assert result.exit_code == 0, (result.output, result.exception)
    return ts_home, home


def e2e_phantom(levels: tuple[str, ...] = E2E_LEVELS) -> dict:
    return make_spine_phantom(E2E_SPACING, hu=E2E_HU, cortex=False, levels=levels, margins=(8, 8, 5),
                              heights=E2E_HEIGHTS, disc_voxels=5, fracture_voxels=2)


_ORACLE_REPORT = """
def main():
    import shutil, types
    import totalsegmentator.bin.totalseg_spine_report as official
    import totalsegmentator.spine_report.utils_report as model_runner

    ct, work, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    work.mkdir(parents=True, exist_ok=True)
    (work / "contrast_phase.json").write_text(json.dumps({"phase": phase}))  # as totalseg_get_phase writes it
    sequential_nnunet()  # upstream's `TotalSegmentator ...` shell command (subprocess.call), run in this process
    model_runner.subprocess = types.SimpleNamespace(
        call=lambda command, **kwargs: totalsegmentator_command_in_process(command))
    page = {}

    def no_browser(templates_path, template_file, template_vars, output_file, width):  # wkhtmltoimage: not on PyPI
        page.update({k: template_vars[k] for k in ("found_fracture", "has_measurements", "contrast_phase",
                                                   "vertebrae_high_height_diff", "vertebrae_low_intensity")})
        shutil.copy(template_vars["report_image"], output_file)

    official.generate_html = no_browser
    metadata = {"PatientSex": "F", "PatientAge": 63, "StudyDescription": "CT", "StudyDate": "20250101", "version": "0.1.0"}
    for update in official.create_spine_report(ct, metadata, work, None, delete_tmp=False, delete_aux_files=False):
        pass
    return {"results": update["report_json"], "page": page}
"""


@pytest.mark.slow
def test_command_matches_official_on_nifti_and_dicom(band_homes: tuple[Path, Path], tmp_path: Path) -> None:
    """`tsrt report spine` end to end (vertebrae_pp_refined and its vertebrae_body helper, measurement, files)
    against official create_spine_report running the same fixture models; both give the phantom's heights."""
    ts_home, home = band_homes
    phantom = e2e_phantom()
    nifti = Path(save_phantom(phantom, tmp_path / "input", "spine")["ct"])
    official = start_official(_ORACLE_REPORT, tmp_path / "official", str(nifti), str(tmp_path / "official" / "tmp"),
                              "native", home=ts_home)
    try:
        nodeinfo = tmp_path / "nodeinfo.json"
        nodeinfo.write_text(json.dumps({"PatientSex": "F", "PatientAge": "063Y", "StudyDescription": "CT",
                                        "StudyDate": "20250101"}))
        documents = {}
        for source in (nifti, write_dicom_series(nifti, tmp_path / "dicom")):
            output = tmp_path / source.name / "spine_report.json"
            result = tsrt_cli("report", "spine", str(source), "-o", str(output), "--contrast-phase", "native",
                              "-n", str(nodeinfo), "-q", "--device", "cpu", home=home)
            assert result.exit_code == 0, (result.output, result.exception)
            documents[source.name] = json.loads(output.read_text())
        theirs = official.result()
    finally:
        official.kill()
    ours, from_dicom = documents[nifti.name]["results"], documents["dicom"]["results"]
    print(f"tsrt {ours}\nofficial {theirs}")
    assert list(ours) == list(theirs["results"]) == list(from_dicom)
    assert ours == pytest.approx(theirs["results"], abs=1e-9)
    assert from_dicom == pytest.approx(ours, abs=1e-9)
    page = theirs["page"]
    assert page["vertebrae_high_height_diff"] == [FRACTURE_LEVEL] and page["vertebrae_low_intensity"] == ["L3"]
    assert documents[nifti.name]["metadata"]["PatientAge"] == 63
    for level, truth in phantom["expected"].items():
        key = f"vertebrae_{level}"
        assert truth["height_mm"] - E2E_SPACING[2] - 0.01 <= ours[f"{key}_height_posterior_mm"] <= truth["height_mm"]
        assert ours[f"{key}_intensity_median"] == truth["hu"]
        assert ours[f"{key}_volume_ml"] == round(truth["volume_ml"], 2)


@pytest.mark.slow
def test_command_refuses_a_spine_without_its_lowest_vertebrae(band_homes: tuple[Path, Path], tmp_path: Path) -> None:
    """No L4/L5 in the scan: one line naming them, a non-zero exit, and no file."""
    _, home = band_homes
    nifti = Path(save_phantom(e2e_phantom(levels=LEVELS[1:4]), tmp_path, "short")["ct"])
    output = tmp_path / "out" / "spine_report.json"
    done = tsrt_process("report", "spine", str(nifti), "-o", str(output), "--contrast-phase", "native",
                        "--device", "cpu", "-q", home=home)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "vertebrae_L4, vertebrae_L5" in lines[0] and "nothing was measured" in lines[0]
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_auto_phase_without_its_classifiers_is_one_line(tmp_path: Path) -> None:
    """The default phase needs tsrt's phase classifiers: one line that also offers --contrast-phase, no file."""
    nifti = Path(save_phantom(make_spine_phantom(cortex=False), tmp_path, "spine")["ct"])
    output = tmp_path / "out" / "spine_report.json"
    done = tsrt_process("report", "spine", str(nifti), "-o", str(output), home=tmp_path / "empty_home")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "--contrast-phase" in lines[0] and not output.parent.exists()
