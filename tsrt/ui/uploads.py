"""Getting a scan into the UI: checked uploads in a private per-session folder, or a file from the image folder.

Uploads are checked before anything reads them (file type by name and by content, size limit), so
a wrong file gets one sentence a clinician can act on instead of a reader's stack trace.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tsrt.models.store import human_size  # sizes read the same in `tsrt models` and the UI
from tsrt.errors import InputError

#: What the UI opens: NIfTI files and zips of one DICOM series (what tsrt.pipeline.read.read_image reads).
INPUT_ENDINGS = (".nii.gz", ".nii", ".zip")
_NIFTI_HEADER_SIZES = {348, 540}  # sizeof_hdr of NIfTI-1 and NIfTI-2, the first 4 bytes of every file
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"


class SessionFolder:
    """A private temp folder for one browser session: its uploads and results live here and nowhere else.

    Removed by `close()`; otherwise when Streamlit forgets the closed session (the session state that
    holds this object is garbage-collected and TemporaryDirectory's finalizer deletes the folder), and
    at the latest when the server process exits.
    """

    def __init__(self, parent: Path | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self._temp = tempfile.TemporaryDirectory(prefix="tsrt-ui-session-", dir=parent)
        self.path = Path(self._temp.name)
        self._count = 0

    def new_folder(self, kind: str) -> Path:
        """An empty subfolder for one upload or one run (earlier ones of the same kind are deleted)."""
        self.clear(kind)
        self._count += 1
        folder = self.path / f"{kind}-{self._count}"
        folder.mkdir()
        return folder

    def clear(self, kind: str) -> None:
        """Delete the subfolders of one kind ("upload", "result")."""
        for old in self.path.glob(f"{kind}-*"):
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self._temp.cleanup()


def input_kind(name: str) -> str | None:
    """"NIfTI" or "DICOM zip" by file name, None for anything else."""
    lowered = name.lower()
    if lowered.endswith((".nii.gz", ".nii")):
        return "NIfTI"
    if lowered.endswith(".zip"):
        return "DICOM zip"
    return None


def check_upload(name: str, size: int, max_bytes: int) -> str:
    """Refuse wrong file types and files over the size limit before saving; returns the input kind."""
    kind = input_kind(name)
    if kind is None:
        raise InputError(
            f"{name} is not a NIfTI file (.nii, .nii.gz) or a zip of one DICOM series (.zip); "
            "export the scan in one of these formats."
        )
    if size == 0:
        raise InputError(f"{name} is empty (0 bytes); copy or export the scan again.")
    if size > max_bytes:
        raise InputError(
            f"{name} is {human_size(size)}, more than this workstation accepts for uploads "
            f"({human_size(max_bytes)}); open it from the image folder instead, or start the UI with a "
            "higher limit (tsrt ui --max-upload-mb)."
        )
    return kind


def check_content(path: Path, name: str) -> None:
    """The file's first bytes must match its name (a renamed PDF or a damaged download is caught here)."""
    kind = input_kind(name)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if kind == "DICOM zip":
        ok = head in _ZIP_MAGICS
    elif name.lower().endswith(".gz"):
        ok = head[:2] == _GZIP_MAGIC and _nifti_header_size(_gunzip_head(path)) in _NIFTI_HEADER_SIZES
    else:
        ok = _nifti_header_size(head) in _NIFTI_HEADER_SIZES
    if not ok:
        what = "zip archive" if kind == "DICOM zip" else "NIfTI image"
        raise InputError(
            f"{name} is named like a {what} but its content is not one (renamed or damaged file); "
            "export the scan again."
        )


def _gunzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(4)
    except (OSError, EOFError):
        return b""


def _nifti_header_size(head: bytes) -> int | None:
    if len(head) < 4:
        return None
    little, big = int.from_bytes(head, "little"), int.from_bytes(head, "big")
    return little if little in _NIFTI_HEADER_SIZES else big


def safe_file_name(name: str) -> str:
    """The upload's base name with anything but letters, digits, dot, dash and underscore replaced."""
    base = Path(name.replace("\\", "/")).name
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned or "upload"


def save_upload(name: str, size: int, stream: BinaryIO, folder: Path, max_bytes: int) -> Path:
    """Check and copy an uploaded file into `folder`; returns its path there."""
    check_upload(name, size, max_bytes)
    target = Path(folder) / safe_file_name(name)
    with open(target, "wb") as handle:
        shutil.copyfileobj(stream, handle, length=1 << 20)
    check_content(target, name)
    return target


def find_images(folder: Path, *, limit: int = 2000, max_depth: int = 4) -> list[Path]:
    """NIfTI files, DICOM zips and folders of DICOM files under `folder`, sorted, at most `limit`."""
    found: list[Path] = []
    for path in _walk(Path(folder), max_depth):
        found.append(path)
        if len(found) >= limit:
            break
    return sorted(found)


def _walk(root: Path, max_depth: int) -> Iterator[Path]:
    base_depth = len(root.parts)
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(here.parts) - base_depth < max_depth else []
        if _holds_dicom(here, files):
            yield here
        for file in sorted(files):
            if input_kind(file) is not None and not file.startswith("."):
                yield here / file


def _holds_dicom(folder: Path, files: list[str]) -> bool:
    """A .dcm file, or one of the first few files carrying DICOM's "DICM" marker (scanners often omit the ending)."""
    if any(f.lower().endswith(".dcm") for f in files):
        return True
    for name in sorted(f for f in files if input_kind(f) is None and not f.startswith("."))[:3]:
        try:
            with open(folder / name, "rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False
