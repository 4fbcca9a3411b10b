"""Refuse malformed inputs before anything heavy happens: what a file *is*, and whether its NIfTI header is sane.

Why this exists: nibabel trusts the header. A damaged header makes it allocate whatever `dim` claims
(MemoryError on 32767^3 voxels), raise its own HeaderDataError, or load an image whose spacing or
header size is invalid with only a warning. Cohort lists were recognised by extension, so a gzip
named `.txt` ended in UnicodeDecodeError. Here the header is read with `struct` — for `.nii.gz` only
the first bytes are inflated; the payload size comes from the gzip trailer or, when that disagrees,
from counting the inflated bytes in bounded chunks, never held in memory — and every field is
checked before nibabel sees the file. Each problem is one `InputError` line that
says what is wrong and what to do, phrased for the person who exported the scan.

Only what makes a file unusable or ambiguous is refused here. What the image *means* (2D, several
volumes, colour/complex voxels, NaN voxels, sheared axes) is left to the read stage, which already
says so in one line.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from tsrt.errors import InputError

#: How much of a file `sniff_file_kind` looks at: enough for the DICOM preamble, a tar header and a text check.
_SNIFF_BYTES = 8192

#: Bytes inflated per step when counting a .nii.gz payload: bounds memory whatever the compression ratio.
_CHUNK = 1 << 20

#: Extension region read for the extension-chain check (tsrt writes label names there; a few MB at most).
_MAX_EXTENSION_BYTES = 64 << 20

#: Deflate cannot compress better than about 1032:1; a .nii.gz claiming more is missing data.
_DEFLATE_MAX_RATIO = 1100

_NIFTI1_SIZE, _NIFTI2_SIZE = 348, 540
_NIFTI1_MIN_OFFSET, _NIFTI2_MIN_OFFSET = 352, 544
_NIFTI2_MAGIC_TAIL = b"\r\n\x1a\n"

#: NIfTI datatype code -> (name, bits per voxel). Codes outside this table are refused.
DATATYPES: dict[int, tuple[str, int]] = {
    1: ("1-bit binary", 1),
    2: ("uint8", 8),
    4: ("int16", 16),
    8: ("int32", 32),
    16: ("float32", 32),
    32: ("complex64", 64),
    64: ("float64", 64),
    128: ("RGB24", 24),
    256: ("int8", 8),
    512: ("uint16", 16),
    768: ("uint32", 32),
    1024: ("int64", 64),
    1280: ("uint64", 64),
    1536: ("float128", 128),
    1792: ("complex128", 128),
    2048: ("complex256", 256),
    2304: ("RGBA32", 32),
}

#: qform/sform codes: unknown, scanner, aligned, talairach, mni152, template (nifti1.h 2019; nibabel agrees).
XFORM_CODES = range(0, 6)

#: nibabel refuses a quaternion whose b^2+c^2+d^2 exceeds 1 by more than this (3 float32 eps).
_QUATERNION_TOLERANCE = 3 * 1.1920929e-07

_REEXPORT = "export the scan again from PACS or the scanner (NIfTI or DICOM)"

#: Leading bytes of formats people hand over by mistake -> (kind, description).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"PK\x07\x08", "zip"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"%PDF", "pdf"),
    (b"GIF8", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"\x93NUMPY", "npy"),
    (b"NRRD", "nrrd"),
)

_DESCRIPTIONS = {
    "empty": "an empty file",
    "nifti1": "a NIfTI-1 image",
    "nifti2": "a NIfTI-2 image",
    "nifti1.gz": "a gzip-compressed NIfTI-1 image",
    "nifti2.gz": "a gzip-compressed NIfTI-2 image",
    "gzip": "a gzip-compressed file",
    "zip": "a zip archive",
    "dicom": "a DICOM file",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "pdf": "a PDF document",
    "gif": "a GIF image",
    "tiff": "a TIFF image",
    "bzip2": "a bzip2-compressed file",
    "xz": "an xz-compressed file",
    "7z": "a 7-Zip archive",
    "tar": "a tar archive",
    "hdf5": "an HDF5 file",
    "npy": "a NumPy array file",
    "nrrd": "an NRRD image",
    "text": "a text file",
    "binary": "unrecognised binary data",
}


# --------------------------------------------------------------------------------------------- file kind


def sniff_file_kind(path: str | Path) -> str:
    """What a file is by its first bytes, never by its name.

    Returns one of: 'empty', 'nifti1', 'nifti2', 'dicom', 'zip', 'png', 'jpeg', 'pdf', 'gif', 'tiff',
    'bzip2', 'xz', '7z', 'tar', 'hdf5', 'npy', 'nrrd', 'text', 'binary', or for gzip files the kind of
    what is inside plus '.gz' ('nifti1.gz', 'tar.gz', ...), or 'gzip' when the inside cannot be read.
    A NIfTI whose magic is damaged still counts as NIfTI when its header size field is right, so the
    header check can say what is damaged instead of "not a NIfTI file".
    """
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    kind = _kind_of_bytes(head)
    if kind != "gzip":
        return kind
    inner = _gunzip_prefix(Path(path), _SNIFF_BYTES)
    if not inner:
        return "gzip"
    inner_kind = _kind_of_bytes(inner)
    return "gzip" if inner_kind in ("gzip", "empty", "binary") else f"{inner_kind}.gz"


def describe_kind(kind: str) -> str:
    """Words for a `sniff_file_kind` result ('a PNG image'), for messages."""
    if kind in _DESCRIPTIONS:
        return _DESCRIPTIONS[kind]
    if kind.endswith(".gz"):
        return f"{_DESCRIPTIONS.get(kind[:-3], 'a file')} compressed with gzip"
    return "an unknown kind of file"


def _what_it_is(kind: str) -> str:
    """'it starts like a PNG image', 'it holds text', ... for "X is not a NIfTI file (...)"."""
    if kind == "text":
        return "it holds text"
    if kind == "binary":
        return "its content is not a known image format"
    if kind == "empty":
        return "it is empty"
    return f"it starts like {describe_kind(kind)}"


def _kind_of_bytes(head: bytes) -> str:
    if not head:
        return "empty"
    nifti = _nifti_version(head)
    if nifti:
        return f"nifti{nifti}"
    if head[128:132] == b"DICM":
        return "dicom"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    if _looks_like_text(head):
        return "text"
    return "binary"


def _nifti_version(head: bytes) -> int:
    """1 or 2 when `head` starts like a NIfTI header (magic, or the header size field), else 0."""
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1") and head[347:348] == b"\x00":
        return 1
    if len(head) >= 8 and head[4:7] in (b"n+2", b"ni2") and head[7:8] == b"\x00":
        return 2
    if len(head) >= 4:
        size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        if _NIFTI1_SIZE in (size_le, size_be):
            return 1
        if _NIFTI2_SIZE in (size_le, size_be):
            return 2
    return 0


def _looks_like_text(head: bytes) -> bool:
    """No NUL bytes, few control characters, and UTF-8 or mostly ASCII (a legacy 8-bit encoding is still text).

    A character cut by the read size at the end of `head` does not count against UTF-8.
    """
    if b"\x00" in head:
        return False
    controls = sum(1 for byte in head if byte < 32 and byte not in (9, 10, 12, 13))
    if controls > len(head) // 100:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut by the read size
            return sum(1 for byte in head if byte >= 128) < len(head) // 10
    return True


def _gunzip_prefix(path: Path, size: int) -> bytes:
    """The first `size` inflated bytes of a gzip file (fewer when it is shorter or damaged early)."""
    out = bytearray()
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while len(out) < size:
                data = decompressor.unconsumed_tail or handle.read(64 * 1024)
                if not data:
                    break
                out += decompressor.decompress(data, size - len(out))
                if decompressor.eof:
                    break
    except zlib.error:
        pass
    return bytes(out)


# --------------------------------------------------------------------------------------------- cohort lists


def read_list_text(path: str | Path) -> str:
    """The text of a cohort list (.txt/.csv), refusing files that are not text whatever their name.

    Why: a NIfTI or gzip renamed `.txt` is not a list of images, and decoding it used to end in a
    UnicodeDecodeError traceback.
    """
    path = Path(path)
    try:
        kind = sniff_file_kind(path)
    except OSError as error:
        raise InputError(f"{path} cannot be opened ({_reason(error)}); check the path and that you may read it.") from None
    if kind.startswith(("nifti", "dicom")):
        suffix = ".nii.gz" if kind.endswith(".gz") else ".nii" if kind.startswith("nifti") else ""
        fix = f"rename it to end in {suffix}" if suffix else "pass it (or its folder) as the input instead"
        raise InputError(f"{path} is {describe_kind(kind)}, not a list of images; {fix}.")
    if kind not in ("text", "empty"):
        raise InputError(
            f"{path} is {describe_kind(kind)}, not a list of images; a cohort list is a text file with one image path "
            "per line (.txt) or a CSV table (.csv)."
        )
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text (byte {error.start}); save the list as UTF-8 (in Excel: 'CSV UTF-8')."
        ) from None


# --------------------------------------------------------------------------------------------- NIfTI header


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/2 header this module checks, as stored (before any interpretation)."""

    version: int  # 1 or 2
    endian: str  # '<' or '>'
    sizeof_hdr: int
    magic: bytes
    dim: tuple[int, ...]  # 8 values, dim[0] = number of dimensions
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]  # 8 values, pixdim[0] = qfac
    vox_offset: float
    scl_slope: float
    scl_inter: float
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]  # b, c, d
    qoffset: tuple[float, float, float]
    srow: tuple[tuple[float, float, float, float], ...]  # srow_x, srow_y, srow_z
    extension_flag: int  # first byte after the header: non-zero when extensions follow

    @property
    def header_size(self) -> int:
        return _NIFTI1_SIZE if self.version == 1 else _NIFTI2_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dim[1 : 1 + self.dim[0]]) if 1 <= self.dim[0] <= 7 else ()

    @property
    def voxel_count(self) -> int:
        return math.prod(self.shape) if self.shape else 0

    @property
    def data_bytes(self) -> int:
        """Bytes the voxel data occupies according to `dim` and `datatype`."""
        bits = DATATYPES.get(self.datatype, ("", 0))[1]
        return (self.voxel_count * bits + 7) // 8


def parse_nifti_header(raw: bytes) -> NiftiHeader:
    """Unpack a NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes) header; `raw` should hold 4 more bytes for the extension flag.

    Byte order comes from the header size field, or (when that is damaged) from dim[0], as nibabel does.
    Raises ValueError when `raw` is not a NIfTI header at all or is too short.
    """
    version = _nifti_version(raw)
    if not version:
        raise ValueError("not a NIfTI header")
    size = _NIFTI1_SIZE if version == 1 else _NIFTI2_SIZE
    if len(raw) < size:
        raise ValueError(f"header is {len(raw)} bytes, shorter than {size}")
    dim_at, dim_format = (40, "8h") if version == 1 else (16, "8q")
    endian = "<"
    for candidate in ("<", ">"):
        if struct.unpack(candidate + "i", raw[:4])[0] == size:
            endian = candidate
            break
    else:
        for candidate in ("<", ">"):
            if 1 <= struct.unpack_from(candidate + dim_format, raw, dim_at)[0] <= 7:
                endian = candidate
                break

    def get(fmt: str, offset: int) -> tuple:
        return struct.unpack_from(endian + fmt, raw, offset)

    extension_flag = raw[size] if len(raw) > size else 0
    if version == 1:
        srow = tuple(get("4f", at) for at in (280, 296, 312))
        return NiftiHeader(
            version=1, endian=endian, sizeof_hdr=get("i", 0)[0], magic=raw[344:348], dim=get("8h", 40),
            datatype=get("h", 70)[0], bitpix=get("h", 72)[0], pixdim=get("8f", 76), vox_offset=get("f", 108)[0],
            scl_slope=get("f", 112)[0], scl_inter=get("f", 116)[0], qform_code=get("h", 252)[0],
            sform_code=get("h", 254)[0], quatern=get("3f", 256), qoffset=get("3f", 268), srow=srow,  # type: ignore[arg-type]
            extension_flag=extension_flag,
        )
    srow = tuple(get("4d", at) for at in (400, 432, 464))
    return NiftiHeader(
        version=2, endian=endian, sizeof_hdr=get("i", 0)[0], magic=raw[4:12], dim=get("8q", 16),
        datatype=get("h", 12)[0], bitpix=get("h", 14)[0], pixdim=get("8d", 104), vox_offset=float(get("q", 168)[0]),
        scl_slope=get("d", 176)[0], scl_inter=get("d", 184)[0], qform_code=get("i", 344)[0],
        sform_code=get("i", 348)[0], quatern=get("3d", 352), qoffset=get("3d", 376), srow=srow,  # type: ignore[arg-type]
        extension_flag=extension_flag,
    )


def header_problems(header: NiftiHeader) -> list[str]:
    """Every problem of the header fields on their own (no file size needed), each a phrase for a message.

    Why each field matters: sizeof_hdr/magic identify the format and byte order; dim sets how much
    is read and allocated; datatype/bitpix how bytes become voxels; pixdim is the voxel size every
    resampling step uses; vox_offset where the voxels start; qform/sform where the image lies in the
    patient — a wrong one makes left and right or positions wrong in the masks.
    """
    problems: list[str] = []
    v1 = header.version == 1
    if header.sizeof_hdr != header.header_size:
        problems.append(f"the header size field says {header.sizeof_hdr} bytes instead of {header.header_size}")
    if v1:
        if header.magic == b"ni1\x00":
            problems.append("it says its voxels are in a separate .img file (a NIfTI pair), not in this file")
        elif header.magic != b"n+1\x00":
            problems.append(f"the NIfTI-1 signature 'n+1' is missing (found {header.magic!r}; an old ANALYZE file?)")
    elif header.magic[:4] == b"ni2\x00":
        problems.append("it says its voxels are in a separate .img file (a NIfTI pair), not in this file")
    elif header.magic[:4] != b"n+2\x00":
        problems.append(f"the NIfTI-2 signature 'n+2' is missing (found {header.magic[:4]!r})")
    elif header.magic[4:] not in (_NIFTI2_MAGIC_TAIL, b"\x00" * 4):
        problems.append("the NIfTI-2 signature was altered by a text-mode transfer (line endings changed)")

    ndim = header.dim[0]
    if not 1 <= ndim <= 7:
        problems.append(f"the number of dimensions is {ndim} (must be 1 to 7)")
    else:
        bad = [(axis, n) for axis, n in enumerate(header.dim[1 : 1 + ndim], start=1) if n < 1]
        if bad:
            listed = ", ".join(f"dim[{axis}] = {n}" for axis, n in bad)
            problems.append(f"the image size is zero or negative ({listed})")

    if header.datatype not in DATATYPES:
        problems.append(f"the voxel type code {header.datatype} is not a NIfTI data type")
    else:
        name, bits = DATATYPES[header.datatype]
        if header.datatype == 1:
            problems.append("it stores 1-bit voxels, which tsrt cannot read")
        elif header.bitpix != bits:
            problems.append(f"the voxel type is {name} ({bits} bits) but the bits-per-voxel field says {header.bitpix}")

    spatial = [axis for axis in (1, 2, 3) if axis <= ndim and header.dim[axis] > 1]
    bad_sizes = [header.pixdim[axis] for axis in spatial if not (math.isfinite(header.pixdim[axis]) and header.pixdim[axis] > 0)]
    if bad_sizes:
        sizes = " x ".join(_number(header.pixdim[axis]) for axis in (1, 2, 3))
        problems.append(f"the voxel size ({sizes} mm) is not positive and finite")

    minimum = _NIFTI1_MIN_OFFSET if v1 else _NIFTI2_MIN_OFFSET
    offset = header.vox_offset
    if not math.isfinite(offset) or offset != int(offset):
        problems.append(f"the voxel data offset ({_number(offset)}) is not a whole byte position")
    elif offset < minimum:
        problems.append(f"the voxel data offset ({int(offset)}) points inside the header (must be at least {minimum})")

    if math.isfinite(header.scl_slope) and header.scl_slope != 0 and not math.isfinite(header.scl_inter):
        problems.append(f"the intensity intercept (scl_inter) is {_number(header.scl_inter)}")

    for label, code in (("qform", header.qform_code), ("sform", header.sform_code)):
        if code not in XFORM_CODES:
            problems.append(f"the {label} code is {code} (must be 0 to 5)")
    if header.qform_code > 0:
        values = (*header.quatern, *header.qoffset)
        if not all(math.isfinite(x) for x in values):
            problems.append("the qform orientation holds NaN or infinite numbers")
        elif sum(x * x for x in header.quatern) - 1 > _QUATERNION_TOLERANCE:
            problems.append("the qform orientation is not a rotation (quaternion longer than 1)")
    if header.sform_code > 0:
        rows = header.srow
        if not all(math.isfinite(x) for row in rows for x in row):
            problems.append("the sform orientation holds NaN or infinite numbers")
        elif _is_singular([row[:3] for row in rows]):
            problems.append("the sform orientation is singular (voxel axes of zero length or lying in one plane)")
    return problems


def check_nifti_file(path: str | Path, *, memory_limit: int | None = None) -> NiftiHeader:
    """Check a .nii/.nii.gz file's header and payload size without loading the voxels; refuse in one line.

    `memory_limit` (bytes) is what the image may need: its voxels as stored plus the float32 copy
    every nnU-Net reader makes. Default: this machine's memory (or the container's limit).
    A .nii.gz whose gzip trailer gives the announced size is not inflated at all; otherwise it is
    inflated in bounded chunks only to count its bytes (and verify its checksum).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
        gzipped = head.startswith(b"\x1f\x8b")
        raw = _gunzip_prefix(path, _SNIFF_BYTES) if gzipped else head
    except OSError as error:
        raise InputError(f"{path} cannot be opened ({_reason(error)}); check the path and that you may read it.") from None

    if size == 0:
        raise InputError(f"{path} is empty (0 bytes); the copy or export did not finish — copy or export it again.")
    if gzipped and not raw:
        raise InputError(
            f"{path} cannot be read as NIfTI: it is a damaged gzip file (nothing can be unpacked); copy or export it again."
        )
    version = _nifti_version(raw)
    if not version:
        raise InputError(
            f"{path} cannot be read as NIfTI: it is not a NIfTI file ({_what_it_is(sniff_file_kind(path))}); "
            "export it again as NIfTI, or pass the DICOM series instead."
        )
    header_size = _NIFTI1_SIZE if version == 1 else _NIFTI2_SIZE
    if len(raw) < header_size:
        raise InputError(
            f"{path} cannot be read as NIfTI: it ends inside its header ({len(raw)} of {header_size} bytes); "
            "the file is incomplete — copy or export it again."
        )
    header = parse_nifti_header(raw)
    problems = header_problems(header)
    if problems:
        others = len(problems) - 1
        more = f" (and {others} more header problem{'s' if others > 1 else ''})" if others else ""
        raise InputError(f"{path} has a damaged NIfTI header: {problems[0]}{more}; {_REEXPORT}.")

    offset, needed = int(header.vox_offset), int(header.vox_offset) + header.data_bytes
    shape = "x".join(str(n) for n in header.shape)
    claimed = f"{shape} {DATATYPES[header.datatype][0]} voxels ({_bytes(header.data_bytes)})"
    if gzipped and needed > size * _DEFLATE_MAX_RATIO:  # decided without inflating anything
        raise InputError(
            f"{path} cannot be read as NIfTI: {_bytes(size)} compressed cannot hold the {claimed} its header announces; "
            "the file is incomplete or its header is damaged — copy or export it again."
        )
    if not gzipped:
        _check_payload_size(path, offset, needed, size, claimed)
    limit = machine_memory() if memory_limit is None else memory_limit
    required = header.data_bytes + 4 * header.voxel_count
    if limit and required > limit:
        raise InputError(
            f"{path} holds {claimed} and needs at least {_bytes(required)} of memory, more than the "
            f"{_bytes(limit)} this machine has; run it on a machine with more memory or crop the scan to the region "
            "of interest."
        )
    _check_extensions(path, header, gzipped)
    if gzipped and _gzip_trailer_size(path) != needed % (1 << 32):
        available, complete = _gunzipped_size(path, stop_after=needed)
        _check_payload_size(path, offset, needed, available, claimed)
        if not complete:
            raise InputError(
                f"{path} cannot be read as NIfTI: it is cut short (its gzip stream does not end properly); "
                "copy or export it again."
            )
    return header


def _check_payload_size(path: Path, offset: int, needed: int, available: int, claimed: str) -> None:
    """The voxel data the header announces must fit in the (inflated) file."""
    if offset > available:
        raise InputError(
            f"{path} cannot be read as NIfTI: its voxel data would start at byte {offset}, beyond the end of the file "
            f"({available} bytes); the file is incomplete or its header is damaged — copy or export it again."
        )
    if needed > available:
        raise InputError(
            f"{path} cannot be read as NIfTI: it holds only {_bytes(available - offset)} of the {claimed} its header "
            "announces; the file is incomplete or its header is damaged — copy or export it again."
        )


def _gzip_trailer_size(path: Path) -> int:
    """ISIZE from the gzip trailer: the inflated size (mod 2^32) of the last member, when the file is complete.

    Why: when it equals what the header announces, the payload is there (a cut file ends in deflate
    data, which matches by chance with odds of 1 in 2^32), so a large scan is not inflated twice;
    a damaged stream with an intact trailer is still refused by the read stage.
    """
    with open(path, "rb") as handle:
        if handle.seek(0, os.SEEK_END) < 4:
            return -1
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]


def check_image_file(path: str | Path, *, memory_limit: int | None = None) -> None:
    """Refuse an input file whose content does not match what its name promises, before it is read.

    .nii/.nii.gz must hold an (uncompressed / gzip-compressed) NIfTI that passes `check_nifti_file`;
    .zip must be a zip archive. Anything else is described by content so the message can say what it is.
    Folders are not checked here (DICOM folders are scanned by the read stage).
    """
    path = Path(path)
    if path.is_dir():
        return
    try:
        kind = sniff_file_kind(path)
    except OSError as error:
        raise InputError(f"{path} cannot be opened ({_reason(error)}); check the path and that you may read it.") from None
    name = path.name.lower()
    if name.endswith(".nii.gz") and kind in ("nifti1", "nifti2"):
        raise InputError(f"{path} is an uncompressed NIfTI file named .nii.gz; rename it to end in .nii.")
    if name.endswith(".nii") and kind in ("nifti1.gz", "nifti2.gz"):
        raise InputError(f"{path} is a gzip-compressed NIfTI file named .nii; rename it to end in .nii.gz.")
    if name.endswith((".nii", ".nii.gz")):
        check_nifti_file(path, memory_limit=memory_limit)
        return
    if name.endswith(".zip"):
        if kind == "empty":
            raise InputError(f"{path} is empty (0 bytes); zip the DICOM folder again.")
        if kind != "zip":
            raise InputError(f"{path} is not a zip archive (it is {describe_kind(kind)}); zip the DICOM folder again.")
        return
    if kind.startswith("nifti"):
        suffix = ".nii.gz" if kind.endswith(".gz") else ".nii"
        raise InputError(f"{path} is {describe_kind(kind)} without a NIfTI file name; rename it to end in {suffix}.")
    if kind == "zip":
        raise InputError(f"{path} is a zip archive without a .zip file name; rename it to end in .zip.")
    if kind == "dicom":
        raise InputError(f"{path} is a single DICOM file; pass the folder (or a .zip) holding all slices of the series.")


def _check_extensions(path: Path, header: NiftiHeader, gzipped: bool) -> None:
    """The header extensions must chain exactly up to the voxel data, or nibabel fails to read the file."""
    offset = int(header.vox_offset)
    room = offset - header.header_size - 4
    if not header.extension_flag or room < 16:
        return
    if room > _MAX_EXTENSION_BYTES:
        raise InputError(
            f"{path} has its voxel data starting at byte {offset}, after {_bytes(room)} of header extensions; "
            f"the header is damaged — {_REEXPORT}."
        )
    start = header.header_size + 4
    if gzipped:
        region = _gunzip_prefix(path, offset)[start:]
    else:
        with open(path, "rb") as handle:
            handle.seek(start)
            region = handle.read(room)
    at = 0
    while room - at >= 16:
        if len(region) < at + 8:
            raise InputError(f"{path} cannot be read as NIfTI: it ends inside its header extensions; the file is incomplete — "
                "copy or export it again.")
        esize = struct.unpack_from(header.endian + "i", region, at)[0]
        if esize < 8 or at + esize > room:
            raise InputError(
                f"{path} has a damaged NIfTI header: the header extensions do not fit before the voxel data "
                f"(an extension of {esize} bytes at byte {start + at}); {_REEXPORT}."
            )
        at += esize


def _gunzipped_size(path: Path, stop_after: int) -> tuple[int, bool]:
    """(inflated size, whether the gzip stream ends properly), counted in bounded chunks.

    Counting stops a little past `stop_after` (data after the voxels is ignored by every reader).
    Raises InputError for a damaged stream (bad data or checksum); a stream cut short returns what it holds.
    """
    total = 0
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while total <= stop_after + _CHUNK:
                data = decompressor.unconsumed_tail or handle.read(_CHUNK)
                if not data:
                    return total, False
                total += len(decompressor.decompress(data, _CHUNK))
                if decompressor.eof:
                    rest = decompressor.unused_data + handle.read(2)
                    if not rest.startswith(b"\x1f\x8b"):  # no further gzip member (padding or the end)
                        return total, True
                    handle.seek(-len(rest), os.SEEK_CUR)
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as error:
        raise InputError(
            f"{path} cannot be read as NIfTI: it is a damaged gzip file ({_reason(error)} after {_bytes(total)}); "
            "copy or export it again."
        ) from None
    return total, True


def machine_memory() -> int:
    """Physical memory, or the container's memory limit when lower; 0 when unknown (no check)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or int(text) + 1):
            total = int(text)
        break
    return total


def _is_singular(matrix: list[tuple[float, ...]]) -> bool:
    """A 3x3 voxel-to-mm matrix that maps some direction to (nearly) nothing."""
    (a, b, c), (d, e, f), (g, h, i) = matrix
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    lengths = [math.sqrt(sum(matrix[row][col] ** 2 for row in range(3))) for col in range(3)]
    scale = math.prod(lengths)
    return scale == 0 or abs(det) <= 1e-6 * scale


def _number(value: float) -> str:
    return f"{value:g}"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB", "EB"):
        if value < 1000 or unit == "EB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{count} bytes"


def _reason(error: BaseException) -> str:
    text = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__
