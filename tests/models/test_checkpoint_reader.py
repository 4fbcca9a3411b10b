"""The torch-free checkpoint reader (tsrt.models.checkpoint) against torch.load and against hostile files.

Real checkpoints come from tsrt_export.fixtures (saved by torch in nnU-Net's format) and the trained demo
model; torch.load (the dev venv's torch) is the oracle for every array, bit for bit. Hostile and broken
files are real checkpoints whose data.pkl is edited with hand-written pickle opcodes, or small archives
written opcode by opcode; each payload would create a sentinel file, and a control shows that the same
bytes do create it under a plain unpickler / torch.load, so "the sentinel does not exist" proves that
the reader never ran it.
"""

from __future__ import annotations

import collections
import hashlib
import pickletools
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tsrt.errors import ModelError
from tsrt.models.checkpoint import NnunetCheckpoint, allowed_globals, read_checkpoint, read_checkpoint_contents

torch = pytest.importorskip("torch", reason="torch.load is the oracle the reader is compared with")
pytest.importorskip("nnunetv2", reason="the fixture generator needs the export extra (torch, nnunetv2)")

from tsrt_export.fixtures import write_result_folder  # noqa: E402

CHECKPOINT = Path("fold_0") / "checkpoint_final.pth"


# --------------------------------------------------------------------------------------------
# Real checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reader_results")


@pytest.fixture(scope="module")
def plain_checkpoint(results_root: Path) -> Path:
    return write_result_folder(results_root, dataset_id=971, dataset_name="ReaderPlain") / CHECKPOINT


@pytest.fixture(scope="module")
def resenc_checkpoint(results_root: Path) -> Path:
    folder = write_result_folder(
        results_root,
        dataset_id=972,
        dataset_name="ReaderResEnc",
        architecture="ResidualEncoderUNet",
        configuration="2d",
        patch_size=(32, 32),
    )
    return folder / CHECKPOINT


def _converted_copy(source: Path, target: Path, dtype: torch.dtype, *, legacy: bool = False) -> Path:
    """The same nnU-Net checkpoint with its network weights in `dtype` (written by torch.save)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = collections.OrderedDict(
        (key, value.to(dtype)) for key, value in checkpoint["network_weights"].items()
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target, _use_new_zipfile_serialization=not legacy)
    return target


def _torch_arrays(path: Path) -> dict[str, np.ndarray]:
    """torch.load's network weights as numpy (bfloat16 as its float32 value, which numpy can hold)."""
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in weights.items()}


def _assert_bitwise_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)  # same keys, same order (the state_dict's)
    for key, reference in expected.items():
        array = got[key]
        assert array.dtype == reference.dtype and array.shape == reference.shape, key
        assert array.tobytes() == np.ascontiguousarray(reference).tobytes(), key
        assert array.flags.c_contiguous and array.flags.writeable, key


@pytest.mark.parametrize(
    "kind", ["plain_fp32", "resenc_2d_fp32", "demo_fp32", "fp16", "bf16", "legacy_fp32", "legacy_fp16"]
)
def test_arrays_equal_torch_load_bit_for_bit(
    kind: str, plain_checkpoint: Path, resenc_checkpoint: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = {
        "plain_fp32": lambda: plain_checkpoint,
        "resenc_2d_fp32": lambda: resenc_checkpoint,
        "demo_fp32": lambda: request.getfixturevalue("demo_checkpoint_path"),
        "fp16": lambda: _converted_copy(plain_checkpoint, tmp_path / "fp16.pth", torch.float16),
        "bf16": lambda: _converted_copy(plain_checkpoint, tmp_path / "bf16.pth", torch.bfloat16),
        "legacy_fp32": lambda: _converted_copy(resenc_checkpoint, tmp_path / "legacy.pth", torch.float32, legacy=True),
        "legacy_fp16": lambda: _converted_copy(plain_checkpoint, tmp_path / "legacy16.pth", torch.float16, legacy=True),
    }[kind]()
    checkpoint = read_checkpoint(path)
    _assert_bitwise_equal(checkpoint.network_weights, _torch_arrays(path))
    if kind in ("fp16", "legacy_fp16"):
        assert {a.dtype for a in checkpoint.network_weights.values()} == {np.dtype(np.float16)}
    if kind == "bf16":
        assert {a.dtype for a in checkpoint.network_weights.values()} == {np.dtype(np.float32)}

    reference = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(checkpoint, NnunetCheckpoint)
    assert checkpoint.trainer_name == reference["trainer_name"]
    assert checkpoint.configuration == reference["init_args"]["configuration"]
    assert checkpoint.fold == str(reference["init_args"]["fold"])
    axes = reference["inference_allowed_mirroring_axes"]
    assert checkpoint.inference_allowed_mirroring_axes == (None if axes is None else list(axes))
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint.training_plans == reference["init_args"]["plans"]
    assert checkpoint.training_dataset_json == reference["init_args"]["dataset_json"]


@pytest.mark.parametrize("which", ["fixture", "demo"])
def test_whole_checkpoint_reads_like_torch_load(
    which: str, plain_checkpoint: Path, request: pytest.FixtureRequest
) -> None:
    """Beyond the weights: the training log (numpy scalars in the trained demo), optimizer state, device."""
    path = plain_checkpoint if which == "fixture" else request.getfixturevalue("demo_checkpoint_path")
    contents = read_checkpoint_contents(path)
    reference = torch.load(path, map_location="cpu", weights_only=False)
    assert contents["logging"] == reference["logging"]
    assert [type(v) for v in contents["logging"]["mean_fg_dice"]] == [
        type(v) for v in reference["logging"]["mean_fg_dice"]
    ]
    assert contents["optimizer_state"] == reference["optimizer_state"]
    for key in ("current_epoch", "_best_ema", "grad_scaler_state", "trainer_name"):
        assert contents[key] == reference[key]
    assert contents["init_args"]["device"].name == str(reference["init_args"]["device"])


@pytest.mark.parametrize("which", ["fixture", "demo"])
def test_real_checkpoints_name_only_allowed_globals(
    which: str, plain_checkpoint: Path, request: pytest.FixtureRequest
) -> None:
    """The allow-list is what real checkpoints hold (measured, not guessed), and no more is needed."""
    for path in [plain_checkpoint if which == "fixture" else request.getfixturevalue("demo_checkpoint_path")]:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
        assert not [
            name for name, _ in opcodes if name in ("STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "EXT1", "EXT2", "EXT4")
        ]
        named = {arg.replace(" ", ".") for name, arg in opcodes if name == "GLOBAL"}
        assert named <= set(allowed_globals()), named - set(allowed_globals())
        assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"} <= named


# --------------------------------------------------------------------------------------------
# Hostile pickles: code that must never run
# --------------------------------------------------------------------------------------------


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _touch_by_os_system(sentinel: Path) -> bytes:
    return b"cposix\nsystem\n" + _unicode(f"touch '{sentinel}'") + b"\x85R0"  # GLOBAL, TUPLE1, REDUCE, POP


def _touch_by_os_system_stack_global(sentinel: Path) -> bytes:
    return _unicode("posix") + _unicode("system") + b"\x93" + _unicode(f"touch '{sentinel}'") + b"\x85R0"


def _touch_by_os_system_inst(sentinel: Path) -> bytes:
    return b"(" + _unicode(f"touch '{sentinel}'") + b"iposix\nsystem\n0"  # MARK, args, INST, POP


def _touch_by_popen(sentinel: Path) -> bytes:
    args = b"(" + _unicode("touch") + _unicode(str(sentinel)) + b"l"  # MARK ... LIST
    return b"csubprocess\nPopen\n" + args + b"\x85R0"


def _touch_by_eval(sentinel: Path) -> bytes:  # Python 2 spelling, as protocol 2 pickles builtins
    return b"c__builtin__\neval\n" + _unicode(f"open({str(sentinel)!r}, 'w').close()") + b"\x85R0"


def _touch_by_exec(sentinel: Path) -> bytes:
    return b"cbuiltins\nexec\n" + _unicode(f"open({str(sentinel)!r}, 'w').close()") + b"\x85R0"


def _touch_by_shutil(sentinel: Path) -> bytes:  # a module outside the allow-list
    return b"cshutil\ncopyfile\n" + _unicode(__file__) + _unicode(str(sentinel)) + b"\x86R0"


#: name -> (payload builder, the global the one-line error must name)
PAYLOADS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "os.system": (_touch_by_os_system, "posix.system"),
    "os.system via STACK_GLOBAL": (_touch_by_os_system_stack_global, "posix.system"),
    "os.system via INST": (_touch_by_os_system_inst, "posix.system"),
    "subprocess.Popen": (_touch_by_popen, "subprocess.Popen"),
    "builtins.eval": (_touch_by_eval, "builtins.eval"),
    "builtins.exec": (_touch_by_exec, "builtins.exec"),
    "shutil.copyfile": (_touch_by_shutil, "shutil.copyfile"),
}


def _records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_archive(path: Path, records: dict[str, bytes]) -> Path:
    """A zip like torch's: every record stored uncompressed, in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return path


def _with_payload(real_checkpoint: Path, target: Path, payload: bytes) -> Path:
    """The real checkpoint with `payload` spliced in right after data.pkl's PROTO opcode (runs first)."""
    records = _records(real_checkpoint)
    name = next(n for n in records if n.endswith("/data.pkl"))
    assert records[name][:2] == b"\x80\x02"
    records[name] = records[name][:2] + payload + records[name][2:]
    return _write_archive(target, records)


def _wait_for(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("payload_name", list(PAYLOADS))
def test_hostile_global_is_refused_before_it_runs(payload_name: str, plain_checkpoint: Path, tmp_path: Path) -> None:
    build_payload, refused_global = PAYLOADS[payload_name]
    sentinel = tmp_path / "reader_ran_the_payload"
    hostile = _with_payload(plain_checkpoint, tmp_path / "hostile.pth", build_payload(sentinel))

    with pytest.raises(ModelError) as caught:
        read_checkpoint(hostile)
    message = str(caught.value)
    assert "\n" not in message
    assert f"refers to {refused_global}," in message and "tampered" in message
    time.sleep(0.2)  # a Popen'd process would have had time to create it
    assert not sentinel.exists()

    # Control: the same bytes are live. torch.load (what nnU-Net does) runs the payload, then loads the weights.
    control = tmp_path / "torch_load_ran_the_payload"
    live = _with_payload(plain_checkpoint, tmp_path / "control.pth", build_payload(control))
    loaded = torch.load(live, map_location="cpu", weights_only=False)
    assert "network_weights" in loaded
    assert _wait_for(control), "the payload is not live, so this test would prove nothing"


def test_module_outside_allow_list_is_never_imported(
    plain_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking up a global imports its module; a refused one is refused before the import."""
    sentinel = tmp_path / "module_was_imported"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "tsrt_hostile_probe.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nvalue = 1\n")
    monkeypatch.syspath_prepend(str(module_dir))
    hostile = _with_payload(plain_checkpoint, tmp_path / "hostile.pth", b"ctsrt_hostile_probe\nvalue\n0")

    with pytest.raises(
        ModelError, match=r"refers to tsrt_hostile_probe\.value, which an nnU-Net checkpoint never holds"
    ):
        read_checkpoint(hostile)
    assert not sentinel.exists() and "tsrt_hostile_probe" not in sys.modules

    torch.load(hostile, map_location="cpu", weights_only=False)  # control: a plain unpickler imports it
    assert sentinel.exists()
    monkeypatch.delitem(sys.modules, "tsrt_hostile_probe")


def test_refusal_in_a_fresh_process_leaves_no_trace(plain_checkpoint: Path, tmp_path: Path) -> None:
    """The CLI's situation: a new interpreter reads the file and exits non-zero with one line."""
    sentinel = tmp_path / "ran"
    hostile = _with_payload(plain_checkpoint, tmp_path / "hostile.pth", _touch_by_os_system(sentinel))
    script = (
        "import sys\n"
        "from tsrt.errors import TsrtError\n"
        "from tsrt.models.checkpoint import read_checkpoint\n"
        "try:\n"
        f"    read_checkpoint({str(hostile)!r})\n"
        "except TsrtError as err:\n"
        "    print(err, file=sys.stderr); sys.exit(err.exit_code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == ModelError.exit_code
    assert len(result.stderr.strip().splitlines()) == 1 and "posix.system" in result.stderr
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------
# Broken archives and out-of-bounds tensors
# --------------------------------------------------------------------------------------------


def _one_line_error(path: Path) -> str:
    with pytest.raises(ModelError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


def test_truncated_zip(plain_checkpoint: Path, tmp_path: Path) -> None:
    data = plain_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) * 3 // 5])
    assert "corrupt or truncated" in _one_line_error(truncated)


def test_flipped_byte_in_a_weight_fails_its_crc(plain_checkpoint: Path, tmp_path: Path) -> None:
    """Bit rot inside a weight record: the archive is intact, the record's CRC-32 no longer matches."""
    with zipfile.ZipFile(plain_checkpoint) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(plain_checkpoint.read_bytes())
    name_length, extra_length = struct.unpack_from("<2H", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_length + extra_length] ^= 0xFF
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    assert "CRC" in _one_line_error(path)


def test_archive_written_without_crcs_is_read(tmp_path: Path) -> None:
    """torch.serialization.set_crc32_options(False) writes every CRC-32 as 0; torch reads such files."""
    from torch.serialization import get_crc32_options, set_crc32_options

    path = tmp_path / "no_crc.pth"
    weights = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    previous = get_crc32_options()
    set_crc32_options(False)
    try:
        torch.save({"network_weights": weights}, path)
    finally:
        set_crc32_options(previous)
    assert {info.CRC for info in zipfile.ZipFile(path).infolist()} == {0}
    assert np.array_equal(read_checkpoint(path).network_weights["w"], weights["w"].numpy())


def test_storage_shorter_than_its_tensor_claims(plain_checkpoint: Path, tmp_path: Path) -> None:
    records = _records(plain_checkpoint)
    name = next(n for n in records if n.endswith("/data/0"))
    records[name] = records[name][:-4]
    message = _one_line_error(_write_archive(tmp_path / "short.pth", records))
    assert "storage 0 holds" in message and "declares" in message


def test_missing_storage_record(plain_checkpoint: Path, tmp_path: Path) -> None:
    records = _records(plain_checkpoint)
    del records[next(n for n in records if n.endswith("/data/1"))]
    assert "refers to storage 1, which the archive lacks" in _one_line_error(
        _write_archive(tmp_path / "m.pth", records)
    )


def _tensor_archive(
    path: Path,
    *,
    numel: int,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    data: bytes,
    storage: str = "FloatStorage",
    byteorder: bytes = b"little",
) -> Path:
    """A minimal checkpoint written opcode by opcode: {'network_weights': OrderedDict(w=<tensor>)}."""

    def ints(values: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"  # MARK, BININT..., TUPLE

    tensor = (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"("
        + _unicode("storage")
        + f"ctorch\n{storage}\n".encode()
        + _unicode("0")
        + _unicode("cpu")
        + b"J"
        + struct.pack("<i", numel)
        + b"tQ"  # TUPLE, BINPERSID
        + b"J"
        + struct.pack("<i", offset)
        + ints(shape)
        + ints(strides)
        + b"\x89ccollections\nOrderedDict\n)RtR"  # NEWFALSE, OrderedDict(), TUPLE, REDUCE
    )
    pickled = (
        b"\x80\x02}" + _unicode("network_weights") + b"ccollections\nOrderedDict\n)R" + _unicode("w") + tensor + b"ss."
    )
    return _write_archive(
        path,
        {
            "archive/data.pkl": pickled,
            "archive/byteorder": byteorder,
            "archive/data/0": data,
            "archive/version": b"3\n",
        },
    )


def test_hand_written_archive_reads_like_torch(tmp_path: Path) -> None:
    """The opcode writer used below is faithful: a valid view reads as torch reads it, byte order included."""
    values = np.arange(12, dtype=np.float32)
    path = _tensor_archive(tmp_path / "ok.pth", numel=12, offset=1, shape=(3, 2), strides=(1, 4), data=values.tobytes())
    expected = torch.load(path, weights_only=True)["network_weights"]["w"].numpy()
    got = read_checkpoint(path).network_weights["w"]
    assert np.array_equal(got, expected)
    assert np.array_equal(got, [[values[1 + i + 4 * j] for j in range(2)] for i in range(3)])

    big = _tensor_archive(
        tmp_path / "big.pth",
        numel=12,
        offset=1,
        shape=(3, 2),
        strides=(1, 4),
        data=values.astype(">f4").tobytes(),
        byteorder=b"big",
    )
    assert np.array_equal(read_checkpoint(big).network_weights["w"], expected)


@pytest.mark.parametrize(
    ("case", "view"),
    [
        ("offset past the end", dict(offset=9, shape=(4,), strides=(1,))),
        ("stride past the end", dict(offset=0, shape=(2, 3), strides=(10, 1))),
        ("huge shape", dict(offset=0, shape=(1 << 30, 1 << 30), strides=(1, 1))),
        ("negative stride", dict(offset=5, shape=(3,), strides=(-1,))),
        ("negative offset", dict(offset=-1, shape=(2,), strides=(1,))),
    ],
)
def test_out_of_bounds_views_are_refused(case: str, view: dict, tmp_path: Path) -> None:
    path = _tensor_archive(tmp_path / "oob.pth", numel=12, data=np.zeros(12, np.float32).tobytes(), **view)
    message = _one_line_error(path)
    assert "outside its storage 0 of 12 elements" in message and "tampered" in message


def test_storage_size_must_match_its_element_count(tmp_path: Path) -> None:
    path = _tensor_archive(tmp_path / "s.pth", numel=12, offset=0, shape=(12,), strides=(1,), data=b"\0" * 40)
    assert "storage 0 holds 40 bytes but declares 12 FloatStorage elements (48 bytes)" in _one_line_error(path)


def test_unknown_storage_type_is_refused(tmp_path: Path) -> None:
    path = _tensor_archive(
        tmp_path / "q.pth", numel=4, offset=0, shape=(4,), strides=(1,), data=b"\0" * 4, storage="QUInt8Storage"
    )
    assert "refers to torch.QUInt8Storage" in _one_line_error(path)


def test_compressed_record_is_refused(plain_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in _records(plain_checkpoint).items():
            archive.writestr(name, data)
    assert "compressed record" in _one_line_error(path)


@pytest.mark.parametrize("kind", ["random bytes", "empty", "zip without data.pkl", "tar", "missing"])
def test_files_that_are_not_checkpoints(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "not_a_checkpoint.pth"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip without data.pkl":
        _write_archive(path, {"archive/version": b"3\n"})
    elif kind == "tar":
        import tarfile

        (tmp_path / "pickle").write_bytes(b"x")
        with tarfile.open(path, "w") as archive:
            archive.add(tmp_path / "pickle", arcname="pickle")
    _one_line_error(path)


def test_checkpoint_without_network_weights(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert "holds no 'network_weights'" in _one_line_error(path)


# --------------------------------------------------------------------------------------------
# Shared fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_checkpoint_path(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained demo checkpoint (tests must not touch the repository's file)."""
    copy = tmp_path_factory.mktemp("demo") / "checkpoint_final.pth"
    shutil.copyfile(demo_checkpoint, copy)
    return copy
