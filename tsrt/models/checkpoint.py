"""Read nnU-Net v2 checkpoints (torch's `.pth`) into numpy arrays without torch, and without running code.

Why: `torch.load(..., weights_only=False)`, which nnU-Net and TotalSegmentator use, unpickles arbitrary
objects, so a tampered checkpoint runs code on the machine that loads it; and a runtime-only install has
no torch at all. This reader unpickles with an allow-list of exactly the globals an nnU-Net checkpoint
holds (measured on checkpoints written by nnU-Net 2.8.1 with torch 2.x: `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2`, `torch.<Type>Storage`, `torch.device`, and for the numpy scalars of
the training log `numpy._core.multiarray.scalar`, `numpy.dtype` and `_codecs.encode`). Every one of them
is replaced by a stand-in that only builds plain data; any other global is refused when the unpickler
looks it up, i.e. before anything it names can run. Tensor data is read from the archive only for the
network weights, after the storage sizes, shapes, strides and offsets are checked against the file.

Both of torch's formats are read: the zip archive (torch >= 1.6: `<prefix>/data.pkl`, `<prefix>/data/<key>`,
`<prefix>/byteorder`) and the legacy stream (magic number, protocol, system info, pickle, storage keys,
raw storages). The tar format of torch < 0.4 is refused in one line.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from tsrt.errors import ModelError
from tsrt.models.store import sha256_file

#: The checkpoint file nnU-Net writes at the end of training (what its predictor loads by default).
CHECKPOINT_NAME = "checkpoint_final.pth"

#: torch.serialization's magic number and protocol version of the legacy (non-zip) format.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: At most this many tensor dimensions (nnU-Net's are <= 5); bounds the work of a hostile shape.
MAX_TENSOR_DIMS = 16

_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
#: A zip local file header: signature, versions, flags, method, time, date, CRC, sizes, name/extra lengths.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


# --------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NnunetCheckpoint:
    """What inference needs from one fold's checkpoint, as numpy arrays and plain data.

    `network_weights` keeps the stored dtype (float32, float16, ...) except bfloat16, which numpy
    lacks: it becomes the float32 with the same value. `trainer_name` and `configuration` are None
    when the checkpoint does not record them (the result folder's name then says which they are).
    `training_plans` / `training_dataset_json` are the plans and dataset.json the trainer was
    initialised with (`init_args`), None when absent.
    """

    path: Path
    network_weights: dict[str, np.ndarray] = field(repr=False)
    trainer_name: str | None
    configuration: str | None
    fold: str | None
    inference_allowed_mirroring_axes: list[int] | None
    sha256: str
    training_plans: dict[str, Any] | None = field(default=None, repr=False)
    training_dataset_json: dict[str, Any] | None = field(default=None, repr=False)


def read_checkpoint(path: Path) -> NnunetCheckpoint:
    """Read an nnU-Net v2 checkpoint without torch; anything unexpected is one ModelError line.

    Refused: globals outside the allow-list (named in the message), archives that are truncated or
    fail their CRC, storages whose size disagrees with their element count, tensor views outside
    their storage, and checkpoints without `network_weights`.
    """
    path = Path(path)
    contents = read_checkpoint_contents(path)
    if not isinstance(contents, dict):
        raise ModelError(
            f"Checkpoint {path} holds a {type(contents).__name__}, not nnU-Net's checkpoint dict: "
            "pass a checkpoint_final.pth written by nnU-Net v2."
        )
    weights = contents.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise ModelError(f"Checkpoint {path} holds no 'network_weights': pass an nnU-Net v2 checkpoint.")
    arrays: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, StoredTensor):
            raise ModelError(
                f"Checkpoint {path} has network weight {key!r} that is a {type(value).__name__}, not a tensor: "
                "pass a checkpoint written by nnU-Net v2."
            )
        arrays[key] = value.to_numpy()
    init_args = contents.get("init_args") if isinstance(contents.get("init_args"), dict) else {}
    return NnunetCheckpoint(
        path=path,
        network_weights=arrays,
        trainer_name=_optional_str(contents.get("trainer_name")),
        configuration=_optional_str(init_args.get("configuration")),
        fold=None if init_args.get("fold") is None else str(init_args.get("fold")),
        inference_allowed_mirroring_axes=_mirroring_axes(path, contents.get("inference_allowed_mirroring_axes")),
        sha256=sha256_file(path),
        training_plans=init_args.get("plans") if isinstance(init_args.get("plans"), dict) else None,
        training_dataset_json=init_args.get("dataset_json")
        if isinstance(init_args.get("dataset_json"), dict)
        else None,
    )


def read_checkpoint_contents(path: Path) -> Any:
    """The unpickled checkpoint object with every tensor as a `StoredTensor` (data not yet read).

    For callers that need more than `read_checkpoint` returns; the same allow-list applies.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
    except FileNotFoundError:
        raise ModelError(
            f"Checkpoint {path} does not exist: pass an nnU-Net v2 result folder's fold checkpoint."
        ) from None
    except OSError as err:
        raise ModelError(f"Checkpoint {path} cannot be opened ({_one_line(err)}): check its permissions.") from None
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        return _ZipCheckpoint(path).load()
    if head.startswith(b"\x80") and head[2:3] == b"\x8a":  # pickle PROTO + LONG1: the legacy magic number
        return _LegacyCheckpoint(path).load()
    if _looks_like_tar(path):
        raise ModelError(
            f"Checkpoint {path} uses torch's tar format (torch < 0.4), which no nnU-Net v2 checkpoint uses: "
            "re-save it with a current torch."
        )
    raise ModelError(
        f"Checkpoint {path} is not a torch checkpoint (neither a zip archive nor torch's legacy format); it is "
        "corrupt or truncated: copy it again from the training machine."
    )


# --------------------------------------------------------------------------------------------
# Storages and tensors (stand-ins for torch's)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageKind:
    """A torch storage type: what `torch.FloatStorage` etc. stand for in the pickle."""

    name: str
    numpy_dtype: str  # little-endian form; the archive's byte order is applied when reading
    is_bfloat16: bool = False

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy_dtype).itemsize

    def __setstate__(self, state: Any) -> None:
        raise _tampered("a storage type with pickled state")


#: torch's storage types (torch/storage.py) and the numpy dtype of their bytes.
STORAGE_KINDS: dict[str, StorageKind] = {
    kind.name: kind
    for kind in (
        StorageKind("DoubleStorage", "<f8"),
        StorageKind("FloatStorage", "<f4"),
        StorageKind("HalfStorage", "<f2"),
        StorageKind("BFloat16Storage", "<u2", is_bfloat16=True),
        StorageKind("LongStorage", "<i8"),
        StorageKind("IntStorage", "<i4"),
        StorageKind("ShortStorage", "<i2"),
        StorageKind("CharStorage", "i1"),
        StorageKind("ByteStorage", "u1"),
        StorageKind("BoolStorage", "?"),
        StorageKind("ComplexFloatStorage", "<c8"),
        StorageKind("ComplexDoubleStorage", "<c16"),
        StorageKind("UntypedStorage", "u1"),
    )
}


class StoredStorage:
    """One storage of the checkpoint: its kind, element count and where its bytes are (read on demand)."""

    __slots__ = ("kind", "numel", "key", "big_endian", "_read")

    def __init__(self, kind: StorageKind, numel: int, key: str, big_endian: bool, read: Callable[[], bytes]) -> None:
        self.kind = kind
        self.numel = numel
        self.key = key
        self.big_endian = big_endian
        self._read = read

    @property
    def nbytes(self) -> int:
        return self.numel * self.kind.itemsize

    def read_bytes(self) -> bytes:
        data = self._read()
        if len(data) != self.nbytes:
            raise ModelError(
                f"Storage {self.key} holds {len(data)} bytes but its {self.numel} {self.kind.name} elements need "
                f"{self.nbytes}: the checkpoint is corrupt or tampered with; do not use it."
            )
        return data

    def __setstate__(self, state: Any) -> None:
        raise _tampered("a storage with pickled state")


class StoredTensor:
    """A tensor of the checkpoint: a strided view into a storage, checked before any byte is read."""

    __slots__ = ("storage", "offset", "shape", "strides")

    def __init__(self, storage: StoredStorage, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.strides = strides
        check_view_bounds(storage, offset, shape, strides)

    @property
    def dtype(self) -> np.dtype:
        """The dtype `to_numpy` returns (bfloat16 reads as float32)."""
        return np.dtype(np.float32) if self.storage.kind.is_bfloat16 else np.dtype(self.storage.kind.numpy_dtype)

    def to_numpy(self) -> np.ndarray:
        """A contiguous array owning its data, in native byte order."""
        kind = self.storage.kind
        check_view_bounds(self.storage, self.offset, self.shape, self.strides)  # again: nothing may have changed it
        stored_dtype = np.dtype(kind.numpy_dtype)
        if self.storage.big_endian and stored_dtype.itemsize > 1:
            stored_dtype = stored_dtype.newbyteorder(">")
        native_dtype = stored_dtype.newbyteorder("=")
        if kind.numpy_dtype == "?":
            stored_dtype = native_dtype = np.dtype(np.uint8)  # any non-zero byte is True, as in torch
        if math.prod(self.shape) == 0:
            values = np.zeros(self.shape, dtype=native_dtype)
        else:
            base = np.frombuffer(self.storage.read_bytes(), dtype=stored_dtype)
            view = np.lib.stride_tricks.as_strided(
                base[self.offset :],
                shape=self.shape,
                strides=tuple(s * stored_dtype.itemsize for s in self.strides),
                writeable=False,
            )
            values = np.array(view, dtype=native_dtype, order="C", copy=True)  # owns its data, contiguous
        if kind.is_bfloat16:
            return (values.astype(np.uint32) << 16).view(np.float32)
        if kind.numpy_dtype == "?":
            return values != 0
        return values

    def __setstate__(self, state: Any) -> None:
        raise _tampered("a tensor with pickled state")


def check_view_bounds(storage: StoredStorage, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """Refuse a tensor view that reaches outside its storage (the check torch's loader does not make)."""
    if not (isinstance(offset, int) and offset >= 0):
        raise _bad_view(storage, f"storage offset {offset!r}")
    if len(shape) != len(strides) or len(shape) > MAX_TENSOR_DIMS:
        raise _bad_view(storage, f"shape {shape} with strides {strides}")
    if any(not isinstance(n, int) or n < 0 for n in shape) or any(not isinstance(s, int) or s < 0 for s in strides):
        raise _bad_view(storage, f"shape {shape} with strides {strides}")
    if math.prod(shape) == 0:
        if offset > storage.numel:
            raise _bad_view(storage, f"storage offset {offset}")
        return
    last_element = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last_element >= storage.numel:
        raise _bad_view(storage, f"view (offset {offset}, shape {shape}, strides {strides})")


def _bad_view(storage: StoredStorage, what: str) -> ModelError:
    return ModelError(
        f"A tensor of the checkpoint has {what} outside its storage {storage.key} of {storage.numel} elements: "
        "the checkpoint is corrupt or tampered with; do not use it."
    )


def _tampered(what: str) -> ModelError:
    return ModelError(
        f"The checkpoint builds {what}, which torch never writes: it may be tampered with; do not use it."
    )


# --------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals: each only builds plain data
# --------------------------------------------------------------------------------------------


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> StoredTensor:
    """torch._utils._rebuild_tensor_v2 for plain dense tensors (no conj/neg bits, no hooks)."""
    if not isinstance(storage, StoredStorage):
        raise _tampered(f"a tensor on a {type(storage).__name__} instead of a storage")
    if metadata:
        raise _tampered("a tensor with conjugate/negative-bit metadata")
    if backward_hooks:
        raise _tampered("a tensor with backward hooks")
    shape = _int_tuple(size, "tensor shape")
    strides = _int_tuple(stride, "tensor strides")
    return StoredTensor(storage, _plain_int(storage_offset, "storage offset"), shape, strides)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> StoredTensor:
    """torch._utils._rebuild_tensor (older torch)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> StoredTensor:
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor for reading."""
    if not isinstance(data, StoredTensor):
        raise _tampered(f"a parameter around a {type(data).__name__}")
    if backward_hooks:
        raise _tampered("a parameter with backward hooks")
    return data


class TorchDevice:
    """Stand-in for torch.device (nnU-Net pickles the training device in init_args); only records its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"TorchDevice({self.name!r})"

    def __setstate__(self, state: Any) -> None:
        raise _tampered("a device with pickled state")


def _torch_device(kind: Any, index: Any = None) -> TorchDevice:
    if not isinstance(kind, str) or (index is not None and not isinstance(index, int)):
        raise _tampered(f"a torch.device({kind!r}, {index!r})")
    return TorchDevice(kind if index is None else f"{kind}:{index}")


#: numpy dtypes a pickled numpy scalar may have: booleans, integers, floats, complex numbers.
_NUMPY_SCALAR_KINDS = re.compile(r"^(\?|b1|[iu][1248]|f[248]|c(8|16))$")


class NumpyDtypeSpec:
    """Stand-in for numpy.dtype(...) + its __setstate__: a plain numeric dtype, nothing else."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _tampered(f"a numpy dtype with state {state!r:.80}")
        if any(item is not None for item in state[2:5]):
            raise _tampered("a structured numpy dtype")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> NumpyDtypeSpec:
    if not isinstance(spec, str) or not _NUMPY_SCALAR_KINDS.match(spec):
        raise _tampered(f"a numpy dtype {spec!r:.40} (only numeric scalars occur in nnU-Net's training log)")
    return NumpyDtypeSpec(np.dtype(spec))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy.core.multiarray.scalar for numeric dtypes: the bytes of one value."""
    if not isinstance(dtype, NumpyDtypeSpec) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _tampered("a numpy scalar that is not one numeric value")
    return np.frombuffer(data, dtype=dtype.dtype, count=1)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for bytes: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _tampered(f"a _codecs.encode call with encoding {encoding!r:.20}")
    return text.encode("latin-1")


def _plain_set(items: Any = ()) -> set:
    return set(_plain_items(items))


def _plain_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_plain_items(items))


def _plain_items(items: Any) -> list:
    if not isinstance(items, (list, tuple)):
        raise _tampered(f"a set built from a {type(items).__name__}")
    return list(items)


def _plain_bytes(items: Any = ()) -> bytes:
    """builtins.bytes as protocol 2 pickles b'' (and bytes from a list of ints); never bytes(huge int)."""
    if isinstance(items, (list, tuple)) and all(isinstance(b, int) for b in items):
        return bytes(items)
    raise _tampered(f"bytes built from a {type(items).__name__}")


def _plain_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not isinstance(real, (int, float)) or not isinstance(imag, (int, float)):
        raise _tampered("a complex number from non-numbers")
    return complex(real, imag)


#: (module, name) -> stand-in. Everything an nnU-Net checkpoint's pickle may name.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "device"): _torch_device,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): _plain_set,
    ("builtins", "frozenset"): _plain_frozenset,
    ("builtins", "bytes"): _plain_bytes,
    ("builtins", "complex"): _plain_complex,
}


def allowed_globals() -> list[str]:
    """The dotted names the reader admits (storage types of `torch` and, as older torch wrote them for GPU
    checkpoints, of `torch.cuda`)."""
    names = [f"{module}.{name}" for module, name in _ALLOWED_GLOBALS]
    names += [f"{module}.{kind}" for module in _STORAGE_MODULES for kind in STORAGE_KINDS]
    return sorted(names)


#: Modules whose storage types a checkpoint may name: torch's, and torch.cuda's in checkpoints older
#: torch saved on a GPU (the data is read to the CPU either way).
_STORAGE_MODULES = ("torch", "torch.cuda")


def _normalised_global(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (protocol 2 pickles write `__builtin__`, `copy_reg`) as Python 3 spells them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves globals only from the allow-list and storages only from the archive.

    `find_class` is where pickle looks up every global (GLOBAL, STACK_GLOBAL, INST, EXT*), so a refused
    name is never imported, let alone called.
    """

    def __init__(self, stream: BinaryIO, source: Path, load_storage: Callable[[tuple], Any]) -> None:
        super().__init__(stream)
        self._source = source
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        module, name = _normalised_global(str(module), str(name))
        if module in _STORAGE_MODULES and name in STORAGE_KINDS:
            return STORAGE_KINDS[name]
        stand_in = _ALLOWED_GLOBALS.get((module, name))
        if stand_in is None:
            raise ModelError(
                f"Checkpoint {self._source} refers to {module}.{name}, which an nnU-Net checkpoint never holds: "
                "it may be tampered with; do not use it."
            )
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise ModelError(
                f"Checkpoint {self._source} refers to a persistent object {str(pid)[:60]!r} that is not a tensor "
                "storage: it may be tampered with; do not use it."
            )
        return self._load_storage(pid)


# --------------------------------------------------------------------------------------------
# The two archive formats
# --------------------------------------------------------------------------------------------


class _ZipCheckpoint:
    """torch's zip archive: `<prefix>/data.pkl` + `<prefix>/data/<key>` (uncompressed) + `<prefix>/byteorder`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.storages: dict[str, StoredStorage] = {}

    def load(self) -> Any:
        try:
            with zipfile.ZipFile(self.path) as archive:
                self.entries = {info.filename: info for info in archive.infolist()}
            # torch.serialization.set_crc32_options(False) writes every CRC-32 as 0: nothing to check then.
            self.has_crc = any(info.CRC != 0 for info in self.entries.values())
            self.prefix = self._prefix(list(self.entries))
            self.big_endian = self._big_endian()
            data = self._read_record(f"{self.prefix}data.pkl")
            return _unpickle(self.path, io.BytesIO(data), self._storage)
        except zipfile.BadZipFile as err:
            raise _corrupt(self.path, err) from None
        except (OSError, EOFError) as err:
            raise _corrupt(self.path, err) from None

    def _prefix(self, names: list[str]) -> str:
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise ModelError(
                    f"{self.path} is a TorchScript archive, not a checkpoint: pass the checkpoint_final.pth "
                    "nnU-Net wrote."
                )
            found = "no data.pkl" if not pickles else f"{len(pickles)} data.pkl records"
            raise ModelError(
                f"{self.path} is a zip archive with {found}, not a torch checkpoint: pass nnU-Net's checkpoint."
            )
        return pickles[0][: -len("data.pkl")]

    def _big_endian(self) -> bool:
        name = f"{self.prefix}byteorder"
        if name not in self.entries:
            return False  # torch before 1.12 wrote no byteorder record; it loads those as little-endian
        order = self._read_record(name)
        if order not in (b"little", b"big"):
            raise ModelError(f"Checkpoint {self.path} declares byte order {order[:20]!r}: it is corrupt.")
        return order == b"big"

    def _storage(self, pid: tuple) -> StoredStorage:
        if len(pid) != 5:
            raise _tampered(f"a storage reference with {len(pid)} fields")
        _, kind, key, location, numel = pid
        key, numel = _storage_key(key), _plain_int(numel, "storage size")
        if not isinstance(kind, StorageKind) or not isinstance(location, (str, bytes)):
            raise _tampered(f"a storage of type {type(kind).__name__}")
        known = self.storages.get(key)
        if known is not None:
            if (known.kind, known.numel) != (kind, numel):
                raise _tampered(f"storage {key} twice with different types or sizes")
            return known
        name = f"{self.prefix}data/{key}"
        info = self.entries.get(name)
        if info is None:
            raise ModelError(
                f"Checkpoint {self.path} refers to storage {key}, which the archive lacks: it is truncated or "
                "corrupt; copy it again from the training machine."
            )
        if info.file_size != numel * kind.itemsize:
            raise ModelError(
                f"Checkpoint {self.path} storage {key} holds {info.file_size} bytes but declares {numel} "
                f"{kind.name} elements ({numel * kind.itemsize} bytes): it is corrupt or tampered with; do not use it."
            )
        storage = StoredStorage(kind, numel, key, self.big_endian, lambda: self._read_record(name))
        self.storages[key] = storage
        return storage

    def _read_record(self, name: str) -> bytes:
        """One record's bytes, read at its local header and checked against its CRC-32.

        torch stores every record uncompressed; a compressed one is refused, since it could also
        inflate without bound. Reading by offset avoids re-parsing the central directory per storage.
        """
        info = self.entries[name]
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ModelError(
                f"Checkpoint {self.path} has a compressed record {name}, which torch never writes: it was "
                "re-packed or tampered with; use the file nnU-Net wrote."
            )
        try:
            with open(self.path, "rb") as stream:
                stream.seek(info.header_offset)
                header = stream.read(_LOCAL_HEADER.size)
                if len(header) != _LOCAL_HEADER.size or header[:4] != _ZIP_MAGIC:
                    raise _corrupt(self.path, zipfile.BadZipFile(f"bad local header of record {name}"))
                name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
                stream.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
                data = stream.read(info.file_size)
        except (OSError, ValueError) as err:
            raise _corrupt(self.path, err) from None
        if len(data) != info.file_size:
            raise _corrupt(self.path, EOFError(f"record {name} ends after the end of the file"))
        if self.has_crc and zlib.crc32(data) != info.CRC:
            raise _corrupt(self.path, zipfile.BadZipFile(f"bad CRC-32 for record {name}"))
        return data


class _LegacyCheckpoint:
    """torch's legacy stream: pickles of magic, protocol, sys info, the object, storage keys; raw storages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.storages: dict[str, StoredStorage] = {}
        self.data_offsets: dict[str, int] = {}

    def load(self) -> Any:
        try:
            with open(self.path, "rb") as stream:
                magic = _unpickle(self.path, stream, self._no_storage)
                if magic != LEGACY_MAGIC_NUMBER:
                    raise ModelError(
                        f"{self.path} is not a torch checkpoint (wrong magic number): pass nnU-Net's checkpoint."
                    )
                protocol = _unpickle(self.path, stream, self._no_storage)
                if protocol != LEGACY_PROTOCOL_VERSION:
                    raise ModelError(
                        f"Checkpoint {self.path} has legacy protocol {protocol!r}, which torch never wrote."
                    )
                system = _unpickle(self.path, stream, self._no_storage)
                if not isinstance(system, dict) or not system.get("little_endian", False):
                    raise ModelError(
                        f"Checkpoint {self.path} was written big-endian in torch's legacy format, which tsrt does not "
                        "read: re-save it with a current torch."
                    )
                contents = _unpickle(self.path, stream, self._storage)
                keys = _unpickle(self.path, stream, self._no_storage)
                self._locate_storages(stream, keys)
                return contents
        except OSError as err:
            raise _corrupt(self.path, err) from None

    def _no_storage(self, pid: tuple) -> Any:
        raise _tampered("a storage reference outside the checkpoint's object")

    def _storage(self, pid: tuple) -> StoredStorage:
        if len(pid) != 6:
            raise _tampered(f"a storage reference with {len(pid)} fields")
        _, kind, key, location, numel, view = pid
        key, numel = _storage_key(key), _plain_int(numel, "storage size")
        if not isinstance(kind, StorageKind) or not isinstance(location, (str, bytes)):
            raise _tampered(f"a storage of type {type(kind).__name__}")
        if view is not None:
            raise ModelError(
                f"Checkpoint {self.path} uses storage views (torch < 1.0), which tsrt does not read: re-save it "
                "with a current torch."
            )
        known = self.storages.get(key)
        if known is not None:
            if (known.kind, known.numel) != (kind, numel):
                raise _tampered(f"storage {key} twice with different types or sizes")
            return known
        storage = StoredStorage(kind, numel, key, False, lambda: self._read_storage(key))
        self.storages[key] = storage
        return storage

    def _locate_storages(self, stream: BinaryIO, keys: Any) -> None:
        """Each storage is an int64 element count then its bytes, in the order of `keys`."""
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(self.storages):
            raise _tampered("a storage key list that disagrees with the tensors")
        size = self.path.stat().st_size
        offset = stream.tell()
        for key in map(str, keys):
            storage = self.storages[key]
            stream.seek(offset)
            header = stream.read(8)
            if len(header) != 8:
                raise _corrupt(self.path, EOFError(f"storage {key} is missing"))
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise ModelError(
                    f"Checkpoint {self.path} storage {key} holds {numel} elements but declares {storage.numel}: "
                    "it is corrupt or tampered with; do not use it."
                )
            self.data_offsets[key] = offset + 8
            offset += 8 + storage.nbytes
            if offset > size:
                raise _corrupt(self.path, EOFError(f"storage {key} ends after the end of the file"))

    def _read_storage(self, key: str) -> bytes:
        with open(self.path, "rb") as stream:
            stream.seek(self.data_offsets[key])
            return stream.read(self.storages[key].nbytes)


def _unpickle(source: Path, stream: BinaryIO, load_storage: Callable[[tuple], Any]) -> Any:
    """One restricted unpickling; everything but ModelError becomes 'corrupt'."""
    try:
        return RestrictedUnpickler(stream, source, load_storage).load()
    except ModelError:
        raise
    except RecursionError:
        raise ModelError(f"Checkpoint {source} nests objects too deeply: it is corrupt or tampered with.") from None
    except Exception as err:  # noqa: BLE001 - any failure of untrusted bytes means: unreadable
        raise _corrupt(source, err) from None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _corrupt(path: Path, err: BaseException) -> ModelError:
    return ModelError(
        f"Checkpoint {path} cannot be read ({type(err).__name__}: {_one_line(err)[:120]}); it is corrupt or "
        "truncated: copy it again from the training machine."
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _plain_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _tampered(f"a {what} of type {type(value).__name__}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMS:
        raise _tampered(f"a {what} {str(value)[:40]}")
    return tuple(_plain_int(v, what) for v in value)


def _storage_key(key: Any) -> str:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) or key.startswith("."):
        raise _tampered(f"a storage key {str(key)[:40]!r}")
    return key


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mirroring_axes(path: Path, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in value
    ):
        return [int(a) for a in value]
    raise ModelError(
        f"Checkpoint {path} records inference_allowed_mirroring_axes {str(value)[:40]}, not a list of axes: "
        "pass a checkpoint written by nnU-Net v2."
    )


def _looks_like_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


__all__ = [
    "CHECKPOINT_NAME",
    "NnunetCheckpoint",
    "RestrictedUnpickler",
    "StoredStorage",
    "StoredTensor",
    "allowed_globals",
    "read_checkpoint",
    "read_checkpoint_contents",
]
