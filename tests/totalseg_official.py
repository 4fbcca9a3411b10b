"""Run official TotalSegmentator functions as test oracles, in a child process.

Why a child process: importing totalsegmentator.nnunet (python_api does on first use) patches
nnU-Net's predictor for the whole process, and the companion tools (totalseg_get_phase, ...)
import python_api at module level. The child refuses every network lookup, and its nnU-Net
predicts in-process (predict_from_files_sequential: the same preprocessing, network and export
as predict_from_files, without spawning worker processes that each import torch). Official pipelines
that start `TotalSegmentator` commands (the report tools) can run them in the child too
(`totalsegmentator_command_in_process`: the same command line through the same CLI entry point).

A script is PREAMBLE + a body defining `main() -> object`; the child prints that object as JSON on
its last stdout line. `start_official` returns at once, so tsrt can run while the oracle does.
`write_dicom_series` turns a NIfTI test input into the DICOM series both sides then read;
`tsrt_cli` / `tsrt_process` run tsrt's command line in or out of process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

PREAMBLE = textwrap.dedent(
    """
    import importlib, json, socket, sys, traceback
    from pathlib import Path

    _connect = socket.socket.connect

    def no_lookup(host, *args, **kwargs):
        raise socket.gaierror("network disabled in this test")

    def no_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network disabled in this test")
        return _connect(self, address)

    socket.getaddrinfo, socket.socket.connect = no_lookup, no_connect

    def sequential_nnunet():
        importlib.import_module("totalsegmentator.nnunet")  # TotalSegmentator's own predictor patch first
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        def in_process(self, source, target, save_probabilities=False, overwrite=True,
                       num_processes_preprocessing=1, num_processes_segmentation_export=1,
                       folder_with_segs_from_prev_stage=None, num_parts=1, part_id=0, **kwargs):
            return self.predict_from_files_sequential(source, target, save_probabilities, overwrite,
                                                      folder_with_segs_from_prev_stage, **kwargs)

        nnUNetPredictor.predict_from_files = in_process

    def totalsegmentator_command_in_process(command):
        # A `TotalSegmentator ...` command line (argv list or shell string) that an official pipeline would
        # start as a child process, run here through the same argument parser and totalsegmentator() call:
        # one torch import instead of one per model run. Call sequential_nnunet() first.
        import shlex
        from totalsegmentator.bin.TotalSegmentator import main as totalsegmentator_cli

        argv = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
        if Path(argv[0]).name != "TotalSegmentator":
            raise AssertionError(f"not a TotalSegmentator command: {argv}")
        saved_argv = sys.argv
        sys.argv = argv
        try:
            totalsegmentator_cli()
        finally:
            sys.argv = saved_argv
        return 0

    def _finish():
        result = main()
        print()
        print(json.dumps(result), flush=True)
    """
)

EPILOGUE = '\nif __name__ == "__main__":\n    _finish()\n'


class OfficialProcess:
    """A running oracle script; `result()` waits for it and returns what its main() returned."""

    def __init__(self, process: subprocess.Popen, stdout: Path, stderr: Path) -> None:
        self.process, self.stdout, self.stderr = process, stdout, stderr
        self._result: object = None
        self._done = False

    def result(self, timeout: float = 1800) -> object:
        if not self._done:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
            lines = [line for line in self.stdout.read_text().splitlines() if line.strip()]
            if self.process.returncode != 0 or not lines:
                raise AssertionError(f"official TotalSegmentator script failed:\n{self.stderr.read_text()[-4000:]}")
            self._result, self._done = json.loads(lines[-1]), True
        return self._result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def start_official(
    body: str, work: Path, *args: str, home: Path | None = None, extra_path: Path | None = None
) -> OfficialProcess:
    """Start PREAMBLE + `body` as a script in `work` (TOTALSEG_HOME_DIR = a copy of `home`).

    `extra_path` goes first on the child's PYTHONPATH (packages only the oracle needs, e.g. antspyx).
    """
    work.mkdir(parents=True, exist_ok=True)
    script = work / "official.py"  # a file: nnU-Net may re-import __main__
    script.write_text(PREAMBLE + textwrap.dedent(body) + EPILOGUE)
    env = {k: v for k, v in os.environ.items() if k != "TOTALSEG_WEIGHTS_PATH" and not k.startswith("nnUNet_")}
    if home is not None:
        copy = work / "home"
        shutil.copytree(home, copy)  # TotalSegmentator writes its prediction counter into config.json
        env["TOTALSEG_HOME_DIR"] = str(copy)
    else:  # no models needed: an empty home that sends no usage statistics
        empty = work / "empty_home"
        empty.mkdir(exist_ok=True)
        (empty / "config.json").write_text(json.dumps({"send_usage_stats": False, "statistics_disclaimer_shown": True}))
        env["TOTALSEG_HOME_DIR"] = str(empty)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *filter(None, [env.get("PYTHONPATH")])])
    stdout, stderr = work / "official.out", work / "official.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, str(script), *args], stdout=out, stderr=err, env=env, cwd=work)
    return OfficialProcess(process, stdout, stderr)


def run_official(body: str, work: Path, *args: str, home: Path | None = None) -> object:
    """Run an oracle script to the end and return its result."""
    return start_official(body, work, *args, home=home).result()


def write_dicom_series(nifti_path: Path, folder: Path, modality: str = "CT") -> Path:
    """The NIfTI volume as an axial DICOM series (one file per slice, `modality` CT or MR), as a scanner stores it.

    SimpleITK's DICOM writer (GDCM) switches the process to the C locale; it is put back afterwards, or
    later tests that read files with the default encoding would read ASCII.
    """
    import locale

    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(nifti_path, folder, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_dicom_series(nifti_path: Path, folder: Path, modality: str) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(sitk.ReadImage(str(nifti_path)), sitk.sitkInt16)
    direction = volume.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                   direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.4242"
    for k in range(volume.GetSize()[2]):
        image = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": modality, "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0020|000e": series,
            "0020|000d": series + ".1", "0020|0052": series + ".0", "0020|0037": orientation, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0008|0018": f"{series}.{k + 2}",
            "0028|1052": "0", "0028|1053": "1", "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(image)
    return folder


def tsrt_cli(*args: str, home: Path):
    """`tsrt ARGS` in this process (Typer's runner) with TSRT_HOME=home; the result holds output and exception."""
    from typer.testing import CliRunner

    from tsrt.cli.root import app, totalsegmentator_argv

    return CliRunner().invoke(app, totalsegmentator_argv(list(args)), env={"TSRT_HOME": str(home)})


def tsrt_process(*args: str, home: Path) -> subprocess.CompletedProcess:
    """`tsrt ARGS` through the real console entry point (one-line errors, exit codes) with TSRT_HOME=home."""
    env = {**os.environ, "TSRT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args], capture_output=True, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
