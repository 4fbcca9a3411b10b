"""`tsrt phase`, `tsrt modality`, `tsrt evans-index`: TotalSegmentator's companion tools on tsrt's runtime.

Registered on the main app by tsrt/cli/root.py. Each takes one image (NIfTI, DICOM folder or zip) or a
cohort (a folder of NIfTI files, or a .txt list) like `tsrt segment`; a cohort writes
OUTPUT/<case>/<file name> per case, skips finished cases unless --overwrite, and reports failures
at the end. Heavy imports happen inside the commands so that `tsrt --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from tsrt.cli.common import DEVICE, PRECISION, PROVIDER, QUIET, VERBOSE
from tsrt.errors import TsrtError

_OVERWRITE = typer.Option(False, "--overwrite", help="Cohorts: process finished cases again instead of skipping them.")
_INPUT = typer.Argument(
    ..., metavar="INPUT", help="NIfTI file, DICOM folder or zip; or a cohort: a folder of NIfTI files or a .txt list."
)


def _configure(quiet: bool, verbose: bool) -> None:
    from tsrt.cli.common import configure_logging

    configure_logging(quiet, verbose)


def run_single_or_cohort(
    source: Path,
    output: Path,
    file_name: str,
    process: Callable[[Path, Path], Any],
    *,
    overwrite: bool,
    quiet: bool,
    verb: str,
) -> None:
    """`process(input, output_file)` on one image, or on every case of a cohort into OUTPUT/<case>/`file_name`."""
    from tsrt.cohort.cases import find_cases, for_each_case

    cases = find_cases(Path(source), Path(output), False)
    if cases is None:
        process(Path(source), Path(output))
        if not quiet:
            typer.echo(f"wrote {output}")
        return
    summary = for_each_case(
        cases,
        lambda case: process(case.input, case.output / file_name),
        lambda case: (case.output / file_name).exists(),
        overwrite=overwrite,
        progress=not quiet,
        verb=verb,
    )
    typer.echo(summary.line())
    if summary.failed:
        raise TsrtError(
            f"{len(summary.failed)} of {len(cases)} cases failed; fix them and run again (finished cases are skipped)."
        )


def phase(
    input_path: Path = _INPUT,
    output: Path = typer.Option(
        Path("contrast_phase.json"), "-o", "--output", help="Result JSON (a cohort: the folder for OUTPUT/<case>/)."
    ),
    existing_stats: Optional[Path] = typer.Option(
        None, "-s", "--existing-stats", "--existing_stats",
        help="statistics.json of `tsrt segment --fast --statistics -sa median -sii`: task total is not run again.",
    ),
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Contrast phase of a CT (pi time in seconds, phase, probability), as totalseg_get_phase."""
    from tsrt.companions.phase import PhaseEstimator, read_statistics
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.pipeline.write import write_json

    _configure(quiet, verbose)
    stats = read_statistics(existing_stats) if existing_stats is not None else None

    def process(image: Path, target: Path) -> None:
        result = estimator.predict(image, stats)
        write_json(result, target)
        if not quiet:
            typer.echo(
                f"{image.name}: {result['phase']} (pi time {result['pi_time']} s, "
                f"probability {result['probability']})"
            )

    if stats is not None:
        from tsrt.cohort.cases import find_cases

        if find_cases(Path(input_path), Path(output), False) is not None:
            raise TsrtError("--existing-stats belongs to one image; drop it for a cohort.")
    estimator = PhaseEstimator(RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision))
    run_single_or_cohort(
        input_path, output, "contrast_phase.json", process, overwrite=overwrite, quiet=quiet, verb="phased"
    )


def modality(
    input_path: Path = _INPUT,
    output: Path = typer.Option(
        Path("modality.json"), "-o", "--output", help="Result JSON (a cohort: the folder for OUTPUT/<case>/)."
    ),
    normalized: bool = typer.Option(
        False, "-n", "--normalized", "--normalized-intensities",
        help="Read the modality from regions of task total_mr --fast (works on rescaled images; slower).",
    ),
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """CT or MR, with probability, as totalseg_get_modality (from intensities, or with -n from regions)."""
    from tsrt.companions.modality import ModalityClassifier
    from tsrt.totalseg.options import RuntimeOptions
    from tsrt.pipeline.write import write_json

    _configure(quiet, verbose)
    classifier = ModalityClassifier(
        normalized=normalized, runtime=RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision)
    )

    def process(image: Path, target: Path) -> None:
        result = classifier.predict(image)
        write_json(result, target)
        if not quiet:
            typer.echo(f"{image.name}: {result['modality']} (probability {result['probability']:.2f})")

    run_single_or_cohort(
        input_path, output, "modality.json", process, overwrite=overwrite, quiet=quiet, verb="classified"
    )


def evans_index(
    input_path: Path = _INPUT,
    output: Path = typer.Option(
        Path("evans_index.json"), "-o", "--output", help="Result JSON (a cohort: the folder for OUTPUT/<case>/)."
    ),
    preview: Optional[Path] = typer.Option(
        None, "-p", "--preview", help="PNG of the measured slice with both widths (default: next to the JSON)."
    ),
    provider: str = PROVIDER,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = _OVERWRITE,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Evans index of a head CT (frontal horn width / inner skull width), as totalseg_evans_index."""
    from tsrt.companions.evans_index import EvansIndexer
    from tsrt.totalseg.options import RuntimeOptions

    _configure(quiet, verbose)
    indexer = EvansIndexer(RuntimeOptions(provider=provider, device=device, quiet=quiet, precision=precision))

    def process(image: Path, target: Path) -> None:
        picture = preview if preview is not None and target == output else target.with_suffix(".png")
        report = indexer.write(image, target, picture)
        if not quiet:
            typer.echo(f"{image.name}: Evans index {report['evans_index']} (picture: {picture})")

    run_single_or_cohort(
        input_path, output, "evans_index.json", process, overwrite=overwrite, quiet=quiet, verb="measured"
    )


def register(app: typer.Typer) -> None:
    """Add the companion commands to the main `tsrt` app."""
    app.command("phase")(phase)
    app.command("modality")(modality)
    app.command("evans-index")(evans_index)
