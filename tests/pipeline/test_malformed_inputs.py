"""A corpus of malformed inputs, each refused in one line before any heavy work, with nothing written.

`build_corpus` starts from the real example CT and writes one broken variant per NIfTI header field
and per file type. Every case is checked twice: by the function that must refuse it (the header
validator, the cohort-list reader or the read stage) for the reason it names, and through the real
CLI for the contract: exit code != 0, exactly one line on stderr, no traceback, no output. The
controls (the original and lossless re-encodings of it) must pass, so an over-strict check fails.
Add a case to `build_corpus` whenever a new kind of broken file turns up.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import shutil
import struct
import json
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.errors import InputError
from tsrt.pipeline.nifti_header import (
    check_image_file,
    check_nifti_file,
    machine_memory,
    read_list_text,
    sniff_file_kind,
)

ORIGINAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "example_ct_sm.nii.gz"
DICOM_SERIES = ORIGINAL.parent / "example_ct_dicom"

pytestmark = pytest.mark.skipif(not ORIGINAL.is_file(), reason=f"real example CT not found at {ORIGINAL}")


@dataclass(frozen=True)
class BadInput:
    """One corpus entry: the file (or folder) to pass as INPUT and the refusal expected for it."""

    path: Path
    refused_by: str  # "header" (nifti_header.check_image_file), "list" (read_list_text) or "read" (read stage)
    reason: str  # a fragment the one-line message must contain


# --------------------------------------------------------------------------------------------- corpus


def _patch(raw: bytes, fmt: str, offset: int, *values) -> bytes:
    """`raw` with the little-endian struct `fmt` at `offset` replaced by `values`."""
    data = bytearray(raw)
    struct.pack_into("<" + fmt, data, offset, *values)
    return bytes(data)


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1, mtime=0)


def _png(width: int = 8, height: int = 8) -> bytes:
    """A real (tiny, black) PNG image, built by hand."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _nifti2_bytes(folder: Path) -> bytes:
    """The original CT re-encoded losslessly as an uncompressed NIfTI-2 file."""
    image = nib.load(ORIGINAL)
    header = nib.Nifti2Header.from_header(image.header)
    path = folder / "nifti2_source.nii"
    nib.Nifti2Image(np.asanyarray(image.dataobj), image.affine, header).to_filename(path)
    raw = path.read_bytes()
    path.unlink()
    return raw


def build_corpus(folder: Path) -> dict[str, BadInput]:
    """Write every broken variant of the example CT into `folder`; name -> what must refuse it and why."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = gzip.decompress(ORIGINAL.read_bytes())  # 352-byte NIfTI-1 header + int16 voxels, little-endian
    assert struct.unpack_from("<i", raw, 0)[0] == 348 and raw[344:348] == b"n+1\x00"
    assert struct.unpack_from("<h", raw, 70)[0] == 4 and struct.unpack_from("<f", raw, 108)[0] == 352
    corpus: dict[str, BadInput] = {}

    def add(name: str, filename: str, content: bytes, reason: str, refused_by: str = "header") -> None:
        path = folder / filename
        path.write_bytes(content)
        corpus[name] = BadInput(path, refused_by, reason)

    def nii_gz(name: str, content: bytes, reason: str) -> None:
        add(name, f"{name.replace(' ', '_')}.nii.gz", _gz(content), reason)

    # --- one case (at least) per header field
    nii_gz("sizeof_hdr 0", _patch(raw, "i", 0, 0), "the header size field says 0 bytes instead of 348")
    nii_gz("sizeof_hdr 540 in a NIfTI-1", _patch(raw, "i", 0, 540), "header size field says 540")
    nii_gz("magic missing", _patch(raw, "4s", 344, b"abcd"), "NIfTI-1 signature 'n+1' is missing")
    nii_gz("magic of a NIfTI pair", _patch(raw, "4s", 344, b"ni1\x00"), "separate .img file")
    nii_gz("dim0 zero", _patch(raw, "h", 40, 0), "number of dimensions is 0 (must be 1 to 7)")
    nii_gz("dim0 eight", _patch(raw, "h", 40, 8), "number of dimensions is 8")
    nii_gz("dim negative", _patch(raw, "h", 44, -101), "image size is zero or negative (dim[2] = -101)")
    nii_gz("dim zero", _patch(raw, "h", 46, 0), "image size is zero or negative (dim[3] = 0)")
    nii_gz("dims exceed the file", _patch(raw, "h", 46, 300), "holds only 739 KB of the 122x101x300 int16")
    add("dims exceed the file, uncompressed", "dims_exceed.nii", _patch(raw, "h", 46, 300), "holds only 739 KB")
    nii_gz("huge dims (NIfTI-1)", _patch(raw, "3h", 42, 32767, 32767, 32767), "cannot hold the 32767x32767x32767")
    nii_gz("datatype unknown", _patch(raw, "h", 70, 3), "voxel type code 3 is not a NIfTI data type")
    nii_gz("datatype 1-bit", _patch(raw, "2h", 70, 1, 1), "1-bit voxels")
    nii_gz("bitpix inconsistent", _patch(raw, "h", 72, 8), "voxel type is int16 (16 bits) but the bits-per-voxel field says 8")
    for label, value in (("zero", 0.0), ("negative", -3.0), ("NaN", math.nan), ("inf", math.inf)):
        nii_gz(f"pixdim {label}", _patch(raw, "f", 84, value), "voxel size")
    nii_gz("vox_offset beyond the file", _patch(raw, "f", 108, 4_000_000.0), "would start at byte 4000000, beyond the end of the file")
    add("vox_offset beyond the file, uncompressed", "offset_beyond.nii", _patch(raw, "f", 108, 4_000_000.0),
        "would start at byte 4000000, beyond the end of the file")
    nii_gz("vox_offset zero", _patch(raw, "f", 108, 0.0), "points inside the header (must be at least 352)")
    nii_gz("vox_offset 100", _patch(raw, "f", 108, 100.0), "points inside the header")
    nii_gz("vox_offset fractional", _patch(raw, "f", 108, 352.5), "not a whole byte position")
    nii_gz("scl_inter infinite", _patch(_patch(raw, "f", 112, 1.0), "f", 116, math.inf), "intercept")
    nii_gz("qform_code invalid", _patch(raw, "h", 252, 9), "qform code is 9")
    nii_gz("sform_code invalid", _patch(raw, "h", 254, -1), "sform code is -1")
    nii_gz("qform NaN", _patch(_patch(raw, "h", 252, 1), "3f", 256, math.nan, 0.0, 0.0), "qform orientation holds NaN")
    nii_gz("qform not a rotation", _patch(_patch(raw, "h", 252, 1), "3f", 256, 1.0, 1.0, 1.0), "not a rotation")
    nii_gz("sform zero axis", _patch(raw, "4f", 280, 0.0, 0.0, 0.0, 0.0), "sform orientation is singular")
    sform_flat = _patch(_patch(raw, "4f", 296, 3.0, 0.0, 0.0, 0.0), "4f", 280, 3.0, 0.0, 0.0, 0.0)
    nii_gz("sform axes in one plane", _patch(sform_flat, "4f", 312, 0.0, 0.0, 0.0, 0.0), "singular")
    nii_gz("sform infinite", _patch(raw, "f", 292, math.inf), "sform orientation holds NaN or infinite")
    # header extensions: the flag says one follows, but its size (0) cannot be right
    extended = _patch(raw[:348], "f", 108, 384.0) + b"\x01\x00\x00\x00" + struct.pack("<ii", 0, 6) + bytes(24) + raw[352:]
    nii_gz("extension size zero", extended, "header extensions do not fit")

    # NIfTI-2: the same real voxels in a 540-byte header
    raw2 = _nifti2_bytes(folder)
    assert raw2[4:12] == b"n+2\x00\r\n\x1a\n"
    add("NIfTI-2 huge dims", "huge2.nii.gz", _gz(_patch(raw2, "3q", 24, 60000, 60000, 60000)),
        "cannot hold the 60000x60000x60000")
    add("NIfTI-2 sizeof_hdr", "sizeof2.nii.gz", _gz(_patch(raw2, "i", 0, 348)), "says 348 bytes instead of 540")
    add("NIfTI-2 text-mode transfer", "eol2.nii.gz", _gz(_patch(raw2, "4s", 8, b"\n\x1a\n\x00")), "text-mode transfer")
    add("NIfTI-2 pixdim NaN", "pixdim2.nii.gz", _gz(_patch(raw2, "d", 112, math.nan)), "voxel size")

    # memory bound: a header claiming more uint8 voxels than this machine can hold (voxels + float32 copy),
    # in a .nii.gz big enough that deflate could in principle hold them, so only the memory bound refuses it
    memory = machine_memory()
    if 0 < memory <= 256 << 30:
        voxels = memory // 5 + (memory // 50)
        slices = -(-voxels // (2048 * 2048))
        header = _patch(_patch(raw[:352], "4h", 40, 3, 2048, 2048, slices), "2h", 70, 2, 8)
        payload = np.random.default_rng(0).bytes(2048 * 2048 * slices // 1000 + 4096)
        add("more voxels than memory", "huge_memory.nii.gz", gzip.compress(header + payload, compresslevel=0, mtime=0),
            "of memory, more than the")

    # --- truncated, cut or empty files
    whole = ORIGINAL.read_bytes()
    add("truncated gzip (half)", "truncated_half.nii.gz", whole[: len(whole) // 2], "holds only")
    add("gzip without its trailer", "no_trailer.nii.gz", whole[:-6], "cut short")
    add("truncated gzip inside the header", "truncated_header.nii.gz", whole[:60], "damaged gzip file")
    add("truncated payload, uncompressed", "truncated.nii", raw[: len(raw) - 1000], "holds only 738 KB")
    add("truncated inside the header, uncompressed", "header_cut.nii", raw[:200], "ends inside its header (200 of 348 bytes)")
    add("empty file", "empty.nii.gz", b"", "is empty")
    corrupt = bytearray(whole)
    corrupt[len(whole) // 2 : len(whole) // 2 + 64] = bytes(64)  # trailer intact: the read stage finds it
    add("gzip damaged mid-stream", "damaged.nii.gz", bytes(corrupt), "cannot be read as NIfTI", "read")

    # --- per file type: content that does not match the name
    add("gzip (NIfTI) named .txt", "scan.txt", whole, "NIfTI-1 image, not a list of images", "list")
    add("gzip (other) named .txt", "archive.txt", _gz(np.random.default_rng(1).bytes(5000)),
        "gzip-compressed file, not a list of images", "list")
    add("NIfTI named .csv", "scan.csv", raw, "is a NIfTI-1 image, not a list of images; rename it to end in .nii", "list")
    add("binary named .txt", "binary.txt", np.random.default_rng(2).bytes(3000), "not a list of images", "list")
    add("Latin-1 list named .csv", "latin1.csv", "path\nDüsseldorf/ct.nii.gz\n".encode("latin-1"), "not UTF-8", "list")
    add("PNG named .nii.gz", "photo.nii.gz", _png(), "not a NIfTI file (it starts like a PNG image); export it again as NIfTI")
    add("random bytes named .nii", "random.nii", np.random.default_rng(3).bytes(20000), "not a NIfTI file")
    add("text named .nii.gz", "notes.nii.gz", b"patient 12, CT abdomen\n" * 20, "not a NIfTI file (it holds text)")
    add("uncompressed NIfTI named .nii.gz", "plain.nii.gz", raw, "rename it to end in .nii")
    add("gzip-compressed NIfTI named .nii", "packed.nii", whole, "rename it to end in .nii.gz")
    add("NIfTI named .zip", "scan.zip", whole, "not a zip archive")
    no_dicom = folder / "no_dicom.zip"
    with zipfile.ZipFile(no_dicom, "w") as archive:
        archive.writestr("readme.txt", "no images here\n")
        archive.writestr("scan.png", _png())
    corpus["zip without DICOM"] = BadInput(no_dicom, "read", "contains no DICOM images")
    if DICOM_SERIES.is_dir():
        series = folder / "dicom_corrupt_slice"
        shutil.copytree(DICOM_SERIES, series)
        slices = sorted(series.iterdir())
        middle = slices[len(slices) // 2]
        middle.chmod(0o644)
        middle.write_bytes(middle.read_bytes()[:-20000])  # pixel data cut short
        corpus["DICOM folder with a corrupt slice"] = BadInput(series, "read", "missing slices")
        single = folder / "one_slice.dcm"
        single.write_bytes(slices[0].read_bytes())
        corpus["single DICOM file"] = BadInput(single, "header", "is a single DICOM file; pass the folder")
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadInput]:
    return build_corpus(tmp_path_factory.mktemp("malformed"))


#: Every corpus case by name, for parametrising (the memory and DICOM cases depend on the machine and data).
CASES = [
    "sizeof_hdr 0", "sizeof_hdr 540 in a NIfTI-1", "magic missing", "magic of a NIfTI pair", "dim0 zero", "dim0 eight",
    "dim negative", "dim zero", "dims exceed the file", "dims exceed the file, uncompressed", "huge dims (NIfTI-1)",
    "datatype unknown", "datatype 1-bit", "bitpix inconsistent", "pixdim zero", "pixdim negative", "pixdim NaN",
    "pixdim inf", "vox_offset beyond the file", "vox_offset beyond the file, uncompressed", "vox_offset zero",
    "vox_offset 100", "vox_offset fractional", "scl_inter infinite", "qform_code invalid", "sform_code invalid",
    "qform NaN", "qform not a rotation", "sform zero axis", "sform axes in one plane", "sform infinite",
    "extension size zero", "NIfTI-2 huge dims", "NIfTI-2 sizeof_hdr", "NIfTI-2 text-mode transfer",
    "NIfTI-2 pixdim NaN", "more voxels than memory", "truncated gzip (half)", "gzip without its trailer",
    "truncated gzip inside the header", "truncated payload, uncompressed", "truncated inside the header, uncompressed",
    "empty file", "gzip damaged mid-stream", "gzip (NIfTI) named .txt", "gzip (other) named .txt", "NIfTI named .csv",
    "binary named .txt", "Latin-1 list named .csv", "PNG named .nii.gz", "random bytes named .nii",
    "text named .nii.gz", "uncompressed NIfTI named .nii.gz", "gzip-compressed NIfTI named .nii", "NIfTI named .zip",
    "zip without DICOM", "DICOM folder with a corrupt slice", "single DICOM file",
]
MACHINE_DEPENDENT = {"more voxels than memory", "DICOM folder with a corrupt slice", "single DICOM file"}


def _get(corpus: dict[str, BadInput], name: str) -> BadInput:
    if name not in corpus:
        pytest.skip(f"{name}: not built on this machine (memory size unknown or > 256 GB, or no DICOM example)")
    return corpus[name]


def test_corpus_names_match_the_generator(corpus: dict[str, BadInput]):
    """The parametrised list and the generator must not drift apart (a case silently left untested)."""
    assert set(corpus) <= set(CASES), set(corpus) - set(CASES)
    assert set(CASES) - set(corpus) <= MACHINE_DEPENDENT, set(CASES) - set(corpus)


# --------------------------------------------------------------------------------------------- the refusing function


def _refusal(function, *args) -> str:
    with pytest.raises(InputError) as caught:
        function(*args)
    message = str(caught.value)
    # the house style (tests/pipeline/test_read_write.py): one sentence, '; ' joins what is wrong to what to do
    assert "\n" not in message and message.endswith(".") and ". " not in message and "; " in message, message
    return message


@pytest.mark.parametrize("name", CASES)
def test_each_case_is_refused_for_its_reason(name: str, corpus: dict[str, BadInput]):
    case = _get(corpus, name)
    if case.refused_by == "header":
        message = _refusal(check_image_file, case.path)
    elif case.refused_by == "list":
        message = _refusal(read_list_text, case.path)
    else:
        from tsrt.pipeline.read import read_image

        message = _refusal(read_image, case.path)
    assert case.reason in message, f"{name}: {message}"
    assert str(case.path) in message, f"{name}: the message should name the file: {message}"


# --------------------------------------------------------------------------------------------- controls


def test_the_original_and_lossless_re_encodings_pass(tmp_path: Path):
    """Too strict a check fails here: real files, NIfTI-2, big-endian, uncompressed and multi-member gzip."""
    raw = gzip.decompress(ORIGINAL.read_bytes())
    image = nib.load(ORIGINAL)
    data = np.asanyarray(image.dataobj)
    controls = [ORIGINAL, *(ORIGINAL.parent / n for n in ("example_ct.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz"))]
    plain = tmp_path / "plain.nii"
    plain.write_bytes(raw)
    nifti2 = tmp_path / "nifti2.nii.gz"
    nib.Nifti2Image(data, image.affine, nib.Nifti2Header.from_header(image.header)).to_filename(nifti2)
    big_endian = tmp_path / "big_endian.nii.gz"
    nib.Nifti1Image(data, image.affine, image.header.as_byteswapped(">")).to_filename(big_endian)
    members = tmp_path / "two_members.nii.gz"  # what concatenating gzip streams gives; the trailer alone does not tell
    members.write_bytes(_gz(raw[:400_000]) + _gz(raw[400_000:]))
    for path in [*controls, plain, nifti2, big_endian, members]:
        if path.is_file():
            check_image_file(path)
    assert nib.load(big_endian).header.endianness == ">" and sniff_file_kind(big_endian) == "nifti1.gz"
    assert sniff_file_kind(nifti2) == "nifti2.gz" and sniff_file_kind(plain) == "nifti1"
    # nibabel reads the re-encodings to the same voxels, so passing them is right
    for path in (plain, nifti2, big_endian, members):
        assert np.array_equal(np.asanyarray(nib.load(path).dataobj), data), path


def test_memory_bound_refuses_before_reading_and_passes_when_there_is_room():
    header = check_nifti_file(ORIGINAL, memory_limit=10**12)
    needed = header.data_bytes + 4 * header.voxel_count
    assert needed == 122 * 101 * 30 * 6
    check_nifti_file(ORIGINAL, memory_limit=needed)
    message = _refusal(lambda: check_nifti_file(ORIGINAL, memory_limit=needed - 1))
    assert "needs at least 2.22 MB of memory" in message


def test_sniffing_reads_content_not_names(corpus: dict[str, BadInput], tmp_path: Path):
    assert sniff_file_kind(corpus["gzip (NIfTI) named .txt"].path) == "nifti1.gz"
    assert sniff_file_kind(corpus["NIfTI named .csv"].path) == "nifti1"
    assert sniff_file_kind(corpus["PNG named .nii.gz"].path) == "png"
    assert sniff_file_kind(corpus["zip without DICOM"].path) == "zip"
    assert sniff_file_kind(corpus["empty file"].path) == "empty"
    assert sniff_file_kind(corpus["text named .nii.gz"].path) == "text"
    assert sniff_file_kind(corpus["random bytes named .nii"].path) == "binary"
    if "DICOM folder with a corrupt slice" in corpus:
        first = sorted(DICOM_SERIES.iterdir())[0]
        assert sniff_file_kind(first) == "dicom"
    listing = tmp_path / "cohort.csv"
    with listing.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["image", "case"], ["Düsseldorf/ct.nii.gz", "düsseldorf"]])
    assert sniff_file_kind(listing) == "text"
    assert "Düsseldorf" in read_list_text(listing)
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes(b"\xef\xbb\xbfa.nii.gz\n")
    assert read_list_text(with_bom) == "a.nii.gz\n"


# --------------------------------------------------------------------------------------------- the CLI contract


def _tsrt(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, run as tests/cli/test_cli_errors.py runs it (its `_tsrt` cannot be imported:
    a site-packages `tests` package shadows this folder), plus a timeout so a hang fails instead of blocking."""
    env = {**os.environ, "TSRT_HOME": os.environ.get("TSRT_HOME", "/tmp/tsrt-test-home")}
    command = [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def _demo_model() -> Path:
    from tsrt.demo.run import demo_model_dir

    return demo_model_dir()


#: Runs tsrt's real entry point once per job in one interpreter (imports are paid once, not per case):
#: the exit code main() gives, everything written to stderr (log handlers re-made per job), or "traceback".
_CLI_DRIVER = r"""
import contextlib, io, json, logging, sys, traceback
from tsrt.cli.root import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    logging.root.handlers.clear()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        sys.argv = ["tsrt", *argv]
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = "traceback"
    results[name] = {"code": code, "stderr": stderr.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli_results(corpus: dict[str, BadInput], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every corpus case through `tsrt segment` (one interpreter for all of them), with its own output path."""
    root = tmp_path_factory.mktemp("cli_outputs")
    jobs = {
        name: ["segment", str(_get(corpus, name).path), "-o", str(root / f"case{index}" / "out" / "seg.nii.gz"),
               "--model", str(_demo_model()), "-q"]
        for index, name in enumerate(CASES)
    }
    env = {**os.environ, "TSRT_HOME": os.environ.get("TSRT_HOME", "/tmp/tsrt-test-home"), "PYTHONUTF8": "1"}
    run = subprocess.run([sys.executable, "-c", _CLI_DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, argv in jobs.items():
        results[name]["output"] = Path(argv[3])
    return results


@pytest.mark.parametrize("name", CASES)
def test_cli_refuses_in_one_line_and_writes_nothing(name: str, corpus: dict[str, BadInput], cli_results: dict):
    case, result = _get(corpus, name), cli_results[name]
    assert result["code"] not in (0, "traceback"), f"{name}: exit {result['code']}\n{result['stderr']}"
    assert "Traceback" not in result["stderr"], f"{name}:\n{result['stderr']}"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsrt: error: "), f"{name}:\n{result['stderr']}"
    assert case.reason in lines[0], f"{name}: {lines[0]}"
    output = result["output"]
    assert not output.exists()
    leftovers = sorted(output.parent.rglob("*")) if output.parent.exists() else []
    assert leftovers == [], f"{name}: partial files {leftovers}"


def test_cli_segments_the_original(tmp_path: Path):
    """The control for the CLI cases: the same command on the untouched CT writes a label map on its grid."""
    output = tmp_path / "out" / "seg.nii.gz"
    result = _tsrt("segment", str(ORIGINAL), "-o", str(output), "--model", str(_demo_model()), "-q")
    assert result.returncode == 0, result.stderr
    assert nib.load(output).shape == nib.load(ORIGINAL).shape


@pytest.mark.parametrize("name", ["PNG named .nii.gz", "sizeof_hdr 0"])
def test_combine_masks_refuses_a_damaged_label_file_in_one_line(name: str, corpus: dict[str, BadInput],
                                                                  tmp_path: Path):
    """`tsrt combine-masks` reads a label file too: the same checks, before nibabel touches it."""
    case = _get(corpus, name)
    output = tmp_path / "out" / "combined.nii.gz"
    command = [sys.executable, "-c", "from tsrt.cli.root import main; main()", "combine-masks", str(case.path), "-o",
               str(output), "-m", "lung"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUTF8": "1"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and case.reason in lines[0], result.stderr
    assert not output.exists()
