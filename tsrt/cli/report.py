"""`tsrt report aorta|pulmonary|spine|body`: TotalSegmentator's clinical reports on tsrt's runtime.

Registered in tsrt/cli/root.py as `app.add_typer(report_app, name="report")`. Each command lives in
tsrt/reports/<name>.py; this file only declares the options. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import typer

from tsrt.cli.common import DEVICE, PRECISION, PROVIDER, QUIET, VERBOSE, configure_logging
from tsrt.errors import InputError, TsrtError

if TYPE_CHECKING:
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.totalseg.source import SourceImage

report_app = typer.Typer(
    help="Clinical reports from the masks (TotalSegmentator's totalseg_*_report commands).",
    no_args_is_help=True,
)

_CT_INPUT = typer.Argument(
    ..., metavar="INPUT",
    help="CT: NIfTI file, DICOM folder or zip; or a cohort (a folder of NIfTI files, a .txt list).",
)
_NODEINFO = typer.Option(
    None, "-n", "--nodeinfo", help="Patient details (nodeinfo.json: PatientName, PatientAge, StudyDate, ...)."
)
_OVERWRITE = typer.Option(False, "--overwrite", help="Cohorts: report on finished cases again.")


@report_app.command("spine")
def spine(
    input_path: Path = _CT_INPUT,
    output: Path = typer.Option(
        "spine_report.json", "-o", "--output",
        help="Result JSON; the page (.html, .png, RGB .nii.gz) and _overview.png go beside it "
        "(a cohort: the folder for OUTPUT/<case>/).",
    ),
    spine_range: str = typer.Option(
        "all", "-sr", "--spine-range", "--spine_range",
        help="Vertebrae reported: all, thoracic_lumbar, lumbar or l1_l4.",
    ),
    contrast_phase: str = typer.Option(
        "auto", "--contrast-phase",
        help="auto (tsrt phase: the phase extra and its classifiers) or the phase: native, arterial_early, "
        "arterial_late, portal_venous, unknown. Sets the attenuation threshold.",
    ),
    nodeinfo: Optional[Path] = typer.Option(
        None, "-n", "--nodeinfo",
        help="Patient details for the page: JSON with DICOM keys "
        "(PatientSex, PatientAge, StudyDescription, StudyDate).",
    ),
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Vertebral body heights, volumes and attenuation, with a lumbar verdict, as totalseg_spine_report."""
    from tsrt.cli.companions import run_single_or_cohort
    from tsrt.reports.spine import SpineReporter, check_spine_range, output_files, read_nodeinfo
    from tsrt.totalseg.options import RuntimeOptions

    configure_logging(quiet, verbose)
    _check_json_output(output)
    check_spine_range(spine_range)  # the cheap checks before the phase classifier and the models
    details = read_nodeinfo(nodeinfo) if nodeinfo is not None else None
    runtime = RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision)
    phase = _spine_phase(contrast_phase, runtime)
    reporter = SpineReporter(runtime, spine_range=spine_range, contrast_phase=phase, nodeinfo=details)

    def process(image: Path, target: Path) -> None:
        report = reporter.write(image, target)
        if not quiet:
            verdict = " ".join(line for line in report.verdict.lines() if line)
            typer.echo(f"{image.name}: {verdict} (page: {output_files(target)['html']})")

    run_single_or_cohort(
        input_path, Path(output), "spine_report.json", process, overwrite=overwrite, quiet=quiet, verb="reported"
    )


def _check_json_output(output: Path) -> None:
    """`-o` is the report's JSON (or a cohort folder): a file name with another ending is refused."""
    if Path(output).suffix and not str(output).lower().endswith(".json"):
        raise TsrtError(f"-o {output} names the report's JSON: give it the ending .json (or a cohort folder).")


def _refuse_masks_for_cohort(option: str, input_path: Path, output: Path) -> None:
    """Masks given with `option` belong to one image: a cohort INPUT is refused."""
    from tsrt.cohort.cases import find_cases

    if find_cases(Path(input_path), Path(output), False) is not None:
        raise TsrtError(f"{option} holds the masks of one image; drop it for a cohort.")


def _spine_phase(choice: str, runtime: RuntimeOptions) -> Union[str, Callable[[SourceImage], str]]:
    """The contrast phase for the spine report: a named phase, or tsrt's phase classifier on each image."""
    import logging

    from tsrt.reports.spine import UNKNOWN_PHASE

    phase = _named_phase_or_estimator(choice, runtime, extra=(UNKNOWN_PHASE,))
    if isinstance(phase, str):
        return phase

    def phase_of(source: SourceImage) -> str:
        try:
            return str(phase.predict(source.image)["phase"])
        except InputError as error:  # no organs to read a phase from: the heights do not need one
            logging.getLogger("tsrt").warning("Contrast phase unknown (%s); using the native threshold.", error)
            return UNKNOWN_PHASE

    return phase_of


def _named_phase_or_estimator(choice: str, runtime: RuntimeOptions, extra: tuple[str, ...] = ()) -> Any:
    """`--contrast-phase`: a phase name as given, or (auto) tsrt's phase estimator; anything else is refused."""
    from tsrt.companions.phase import PHASE_BANDS, PhaseEstimator

    named = (*dict.fromkeys(phase for _, phase, _ in PHASE_BANDS), *extra)
    if choice in named:
        return choice
    if choice != "auto":
        raise TsrtError(f"Unknown contrast phase {choice!r}: use auto or one of {', '.join(named)}.")
    try:
        return PhaseEstimator(runtime)
    except TsrtError as error:
        raise type(error)(f"{str(error).rstrip('.')}; or name the phase: --contrast-phase native|portal_venous|...") from None


@report_app.command("pulmonary")
def pulmonary(
    input_path: Path = typer.Argument(
        ..., metavar="INPUT", help="Chest CT: NIfTI file, DICOM folder or zip; or a cohort (a folder of NIfTI files, a .txt list)."
    ),
    output: Path = typer.Option(
        "pulmonary_report.json", "-o", "--output",
        help="Result JSON; the page (RGB .nii.gz, .png) and the log (.txt) go beside it "
        "(a folder: FOLDER/pulmonary_report.*; a cohort: the folder for OUTPUT/<case>/).",
    ),
    rois: Optional[Path] = typer.Option(
        None, "--rois", "-rt", "-rd",
        help="Use these masks instead of running the models: a folder with pulmonary_artery.nii.gz and "
        "pul_annulus, pul_sinotubular_junction, pul_bifurcation, pul_left_start, pul_right_start (.nii.gz) on INPUT.",
    ),
    nodeinfo: Optional[Path] = _NODEINFO,
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Pulmonary artery area and diameters at five landmarks, as totalseg_pulmonary_report --run_models."""
    import time

    from tsrt.cli.companions import run_single_or_cohort
    from tsrt.reports.pulmonary import (
        JSON_NAME, PulmonaryReporter, check_ct_shape, check_masks, load_metadata, masks_from_folder, measure,
        output_files, write_report,
    )
    from tsrt.totalseg.options import RuntimeOptions

    configure_logging(quiet, verbose)
    metadata = load_metadata(nodeinfo)  # the cheap checks (age) before the models
    runtime = RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision)
    if rois is not None:
        _refuse_masks_for_cohort("--rois", input_path, output)
        reporter = None
    else:
        reporter = PulmonaryReporter(runtime)

    def process(image: Path, target: Path) -> None:
        started = time.time()
        if reporter is None:
            masks = masks_from_folder(image, rois)
            check_ct_shape(masks.ct.data.shape)
            check_masks(masks)
            measurement = measure(masks, metadata)
        else:
            measurement = reporter.measure(image, metadata)
        report = write_report(measurement, target, started)
        if not quiet:
            found = [f"{entry['name']} {entry['diameter']} x {entry['diameter_pd']} cm"
                     for entry in report["landmarks"].values() if entry["diameter"] is not None]
            typer.echo(f"{image.name}: {'; '.join(found)} (page: {output_files(target)['png']})")

    run_single_or_cohort(input_path, Path(output), JSON_NAME, process, overwrite=overwrite, quiet=quiet, verb="reported")


@report_app.command("aorta")
def aorta(
    input_path: Path = _CT_INPUT,
    output: Path = typer.Option(
        "aorta_report.json", "-o", "--output",
        help="Result JSON (upstream's -j); the page (.png) and the diameter profile (_profile.csv) go beside it "
        "(a cohort: the folder for OUTPUT/<case>/).",
    ),
    pdf: bool = typer.Option(False, "--pdf", help="Also write the page as a one-page PDF (.pdf beside the JSON)."),
    nifti: bool = typer.Option(False, "--nifti", help="Also write the page as an RGB NIfTI (.nii.gz), upstream's -o."),
    cpr: bool = typer.Option(False, "-c", "--cpr", help="Also write the curved planar reformation overview (_cpr.png)."),
    cpr_animated: bool = typer.Option(
        False, "-ca", "--cpr-animated", "--cpr_animated",
        help="Also write the CPR scrolled along the aorta, one RGB NIfTI frame per diameter-profile sample "
        "(_cpr_animated.nii.gz), upstream's -ca.",
    ),
    rois_totalseg: Optional[Path] = typer.Option(
        None, "-rt", "--rois-totalseg", "--rois_totalseg",
        help="Use these masks instead of running the models: TotalSegmentator's <class>.nii.gz files on INPUT "
        "(aorta, brachiocephalic_trunk, subclavian_artery_left, vertebrae_T12, iliac_artery_right, celiac_trunk, ...).",
    ),
    rois_details: Optional[Path] = typer.Option(
        None, "-rd", "--rois-details", "--rois_details",
        help="With -rt: the folder of annulus_proper, sinotubular_junction, aorta_true_lumen/false_lumen (default: -rt).",
    ),
    contrast_phase: str = typer.Option(
        "auto", "--contrast-phase",
        help="auto (tsrt phase: the phase extra and its classifiers; run only when the lumen masks are used) or the "
        "phase: native (ignores the true/false lumen model), arterial_early, arterial_late, portal_venous.",
    ),
    skip_dissection: bool = typer.Option(
        False, "-sd", "--skip-dissection", "--skip_dissection", help="Do not use the true/false lumen model."
    ),
    erosion: bool = typer.Option(False, "-e", "--erosion", help="Erode the masks by one voxel before cutting them."),
    nodeinfo: Optional[Path] = _NODEINFO,
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Aorta diameters at 11 landmarks and per section (centerline, cross-sections), as totalseg_aorta_report."""
    from tsrt.cli.companions import run_single_or_cohort
    from tsrt.reports.aorta import (
        AortaReporter, aorta_output_files, load_metadata, masks_from_folders, measure, write_outputs,
    )
    from tsrt.reports.aorta_geometry import require_scientific
    from tsrt.totalseg.options import RuntimeOptions

    configure_logging(quiet, verbose)
    _check_json_output(output)
    require_scientific()
    metadata = load_metadata(nodeinfo)  # the cheap checks (age) before the models
    runtime = RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision)
    phase = _aorta_phase(contrast_phase, runtime, skip_dissection)
    if rois_totalseg is not None:
        _refuse_masks_for_cohort("--rois-totalseg", input_path, output)
        reporter = None
    else:
        reporter = AortaReporter(runtime, contrast_phase=phase, skip_dissection=skip_dissection, erosion=erosion)

    def process(image: Path, target: Path) -> None:
        if reporter is None:
            report = measure(
                masks_from_folders(image, rois_totalseg, rois_details), metadata=metadata, contrast_phase=phase,
                skip_dissection=skip_dissection, erosion=erosion,
            )
        else:
            report = reporter.report(image, metadata)
        files = aorta_output_files(target, pdf=pdf, nifti=nifti, cpr=cpr, cpr_animated=cpr_animated)
        write_outputs(report, files)
        if not quiet:
            total = report.json["section_stats"]["aorta_total"]
            widest = "-" if total["max_diameter"] is None else f"{total['max_diameter']} cm"
            typer.echo(f"{image.name}: widest aorta diameter {widest} (page: {files.picture})")

    run_single_or_cohort(
        input_path, Path(output), "aorta_report.json", process, overwrite=overwrite, quiet=quiet, verb="reported"
    )


def _aorta_phase(choice: str, runtime: RuntimeOptions, skip_dissection: bool) -> Union[str, Callable, None]:
    """The contrast phase for the aorta report: a named phase, or tsrt's phase classifier (asked only when needed)."""
    if skip_dissection and choice == "auto":
        return None
    phase = _named_phase_or_estimator(choice, runtime)
    if isinstance(phase, str):
        return phase
    return lambda image: phase.predict(image)["phase"]


@report_app.command("body")
def body(
    input_path: Optional[Path] = typer.Argument(
        None, metavar="INPUT",
        help="CT or MR: NIfTI file, DICOM folder or zip; or a cohort (a folder of NIfTI files, a .txt list).",
    ),
    input_option: Optional[Path] = typer.Option(None, "-i", "--input", help="Same as INPUT (upstream's spelling)."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Result JSON (default: only printed); a cohort: the folder for OUTPUT/<case>/body_stats.json.",
    ),
    modality: str = typer.Option(..., "-m", "--modality", help="ct or mr."),
    model_type: str = typer.Option(
        "cnn", "-mt", "--model_type", "--model-type",
        help="cnn (a ResNet3D on the scan) or xgboost (organ, vertebra and tissue measurements).",
    ),
    only_weight: bool = typer.Option(
        False, "--only_weight", "--only-weight", help="Predict only the body weight (no size, age, sex, BMI, BSA)."
    ),
    skip_canonical: bool = typer.Option(
        False, "-sc", "--skip_canonical", "--skip-canonical", help="Do not turn the scan to the closest canonical orientation."
    ),
    test_time_augmentation: bool = typer.Option(
        False, "-tta", "--test_time_augmentation", "--test-time-augmentation",
        help="cnn: the mean over six variants (flipped along each axis, with and without the canonical turn).",
    ),
    fold: str = typer.Option("all", "-f", "--fold", help="A fold (0-4), or all: the mean of the five folds."),
    license_number: Optional[str] = typer.Option(
        None, "-l", "--license_number", "--license-number",
        help="Store this TotalSegmentator license key first (tissue_types and the CNNs are licensed).",
    ),
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Body weight, height, age and sex (with BMI and BSA) predicted from a scan, as totalseg_get_body_stats."""
    from tsrt.cli.companions import run_single_or_cohort
    from tsrt.cohort.cases import find_cases
    from tsrt.reports.body import JSON_NAME, BodyReporter, BodyStatsOptions, parse_fold
    from tsrt.totalseg.options import RuntimeOptions

    configure_logging(quiet, verbose)
    source = input_option or input_path
    if source is None:
        raise TsrtError("No input given: pass the CT or MR as INPUT or with -i.")
    if output is not None:
        _check_json_output(output)
    cohort = find_cases(Path(source), Path(output or "."), False) is not None
    if cohort and output is None:
        raise TsrtError("A cohort needs -o OUTPUT: each case's result goes to OUTPUT/<case>/body_stats.json.")
    options = BodyStatsOptions(modality.lower(), model_type.lower(), only_weight, skip_canonical,
                               test_time_augmentation, parse_fold(fold))  # checked before the models
    if license_number is not None:
        from tsrt.models.download import set_license_key

        set_license_key(license_number, validate=False)
    reporter = BodyReporter(RuntimeOptions(provider=provider, device=device, quiet=quiet), options)

    def process(image: Path, target: Optional[Path]) -> None:
        report = reporter.report(image) if target is None else reporter.write(image, target)
        if not quiet:
            if cohort:
                typer.echo(f"{image.name}:")
            typer.echo("\n".join(report.lines()))

    if output is None:
        process(Path(source), None)
        return
    run_single_or_cohort(Path(source), Path(output), JSON_NAME, process, overwrite=overwrite, quiet=quiet,
                         verb="reported")
