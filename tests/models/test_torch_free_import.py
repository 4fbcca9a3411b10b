"""`tsrt models import` and `tsrt export` without torch equal the torch exporter's results.

The source is the session's fixture TotalSegmentator home (tests/conftest.py `totalseg_home`: real
nnU-Net result folders in TotalSegmentator's layout, small seeded nets). One store is imported in a
subprocess in which torch, nnU-Net and the export toolchain cannot be imported (the runtime-only
situation), the other with the torch exporter (tsrt_export.import_totalseg). They must hold the same
files and plans (all but `versions`, `graph_builder` and the graph hashes), graphs with the same logits,
and segment example_ct_sm (`tsrt -i ... --fast --ml`) voxel for voxel alike. Hostile and broken
checkpoints stop `tsrt models import` with one line, a non-zero exit code and nothing in the store,
and the payload never runs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest

from tsrt.errors import ModelError
from tsrt.models.onnx_graph import BUILDER_NAME
from tsrt.models.plan import TORCH_GRAPH_BUILDER, read_plan
from tsrt.models.registry import get_task

pytest.importorskip("nnunetv2", reason="the fixture home and the torch-exported reference need the export extra")

from tsrt_export.import_totalseg import import_task as import_task_with_torch  # noqa: E402
from tsrt_export.onnx_export import export_model  # noqa: E402
from tsrt_export.verify import FP32_TOLERANCE_FRACTION, compare_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: The tasks imported both ways: total's five parts, total --fast, total_mr (2 parts) and --fast, and a sub-task with a crop
#: model (heartchambers_highres: its own model, cropped to the heart found by total --fast's model).
TASKS = {"total": get_task("total"), "total --fast": get_task("total", fast=True), "total_mr": get_task("total_mr"),
         "total_mr --fast": get_task("total_mr", fast=True), "heartchambers_highres": get_task("heartchambers_highres")}
#: The sub-task's own model lives in a second TotalSegmentator home (its crop model is already in the store).
SUBTASK = "heartchambers_highres"
FAST_MODEL = get_task("total", fast=True).parts[0]
#: What a runtime-only install lacks; the subprocesses make their import fail.
BLOCKED = ("torch", "torchvision", "nnunetv2", "dynamic_network_architectures", "tsrt_export", "totalsegmentator")
#: Plan fields that say which path built the graph, or hash its bytes; every other field must be equal.
BUILDER_FIELDS = {"versions", "graph_builder", "graph_sha256"}


def _blocking_prelude() -> str:
    return f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None  # import raises ImportError\n"


def _run_cli_without_torch(argv_list: list[list[str]], env: dict[str, str], cwd: Path) -> dict:
    """Run `tsrt ARGS...` (each list, in order, in one interpreter without torch); times and what got loaded."""
    script = _blocking_prelude() + textwrap.dedent(f"""
        import json, time
        from tsrt.cli.root import main
        seconds = []
        for argv in {argv_list!r}:
            sys.argv = ["tsrt", *argv]
            start = time.perf_counter()
            try:
                main()
            except SystemExit as stop:
                if stop.code:
                    raise
            seconds.append(time.perf_counter() - start)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
        print(json.dumps({{"seconds": seconds, "loaded": loaded}}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stores(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TSRT_HOMEs holding TASKS: `free` imported without torch (CLI, subprocess), `torch` by the torch exporter."""
    from tsrt_export.fixtures import write_totalseg_home

    root = tmp_path_factory.mktemp("two_stores")
    free, with_torch = root / "free", root / "torch"
    subtask_home = write_totalseg_home(root / "subtask_home", (SUBTASK,))
    homes = {name: subtask_home if name == SUBTASK else totalseg_home for name in TASKS}
    env = {**os.environ, "TSRT_HOME": str(free), "PYTHONUTF8": "1"}
    argv = [["models", "import", *name.split(), "--totalseg-home", str(homes[name]), "-q"] for name in TASKS]
    run = _run_cli_without_torch(argv, env, root)
    assert run["loaded"] == []
    started = time.perf_counter()
    torch_seconds = []
    for name, task in TASKS.items():
        import_task_with_torch(task, homes[name], store_root=with_torch / "models", progress=False)
        torch_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
    print(
        "import seconds (fixture nets: 4 stages, 4..32 features, 48^3 patches) torch-free vs torch: "
        + ", ".join(f"{name} {a:.1f} vs {b:.1f}" for name, a, b in zip(TASKS, run["seconds"], torch_seconds))
    )
    return {"free": free, "torch": with_torch}


def _store_files(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_torch_free_store_has_the_same_files_and_plans(stores: dict[str, Path]) -> None:
    free, with_torch = stores["free"], stores["torch"]
    assert _store_files(free) == _store_files(with_torch)
    models = list({model.name: model for task in TASKS.values() for model in task.required_models}.values())
    assert len(models) == 10  # total's 5 parts, total --fast, total_mr's 2 parts, total_mr --fast, heartchambers
    for model in models:
        for fold in model.fold_names or ("0",):
            ours = read_plan(free / "models" / model.name / f"fold_{fold}.plan.json")
            theirs = read_plan(with_torch / "models" / model.name / f"fold_{fold}.plan.json")
            assert (ours.graph_builder, theirs.graph_builder) == (BUILDER_NAME, TORCH_GRAPH_BUILDER)
            assert "torch" not in ours.versions and theirs.versions["torch"] != "not installed"
            mine = {k: v for k, v in ours.to_dict().items() if k not in BUILDER_FIELDS}
            reference = {k: v for k, v in theirs.to_dict().items() if k not in BUILDER_FIELDS}
            assert mine == reference, model.name
            report = json.loads((free / "models" / model.name / f"fold_{fold}.verify.json").read_text())
            assert report["passed"] is True and report["compared_with_torch"] is False
            assert "not compared against torch" in report["reference"]


def _logits(graph: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_every_imported_graph_gives_the_torch_exports_logits(stores: dict[str, Path]) -> None:
    for model in (m for task in TASKS.values() for m in task.required_models):
        plan = read_plan(stores["free"] / "models" / model.name / "fold_0.plan.json")
        x = np.random.default_rng(11).standard_normal((1, 1, *plan.patch_size), dtype=np.float32)
        reference = _logits(stores["torch"] / "models" / model.name / "fold_0.onnx", x)
        candidate = _logits(plan.graph_path, x)
        report = compare_logits(model.name, reference, candidate, tolerance_fraction=FP32_TOLERANCE_FRACTION,
                                has_regions=False)
        print(f"{model.name}: max|Δ| {report.max_abs_diff:.3g} (logit range {report.logit_range:.3g})")
        assert report.passed and report.agreement == 1.0, report.summary()


def _labels_from_each_store(stores: dict[str, Path], args: list[str], tmp_path: Path) -> dict[str, np.ndarray]:
    """`tsrt -i ... -o STORE.nii.gz ARGS --ml` once per store: the label maps."""
    labels = {}
    for name, home in stores.items():
        output = tmp_path / f"{name}.nii.gz"
        env = {**os.environ, "TSRT_HOME": str(home), "PYTHONUTF8": "1"}
        result = subprocess.run(
            [sys.executable, "-c", "from tsrt.cli.root import main; main()", *args, "-o", str(output), "--ml", "-q"],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        labels[name] = np.asarray(nib.load(output).dataobj)
    return labels


def test_masks_of_both_stores_are_voxel_equal(stores: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    """`tsrt -i example_ct_sm.nii.gz -o seg.nii.gz --fast --ml`, once per store."""
    labels = _labels_from_each_store(stores, ["-i", str(shared_data / "example_ct_sm.nii.gz"), "--fast"], tmp_path)
    assert len(np.unique(labels["torch"])) > 2, "the fixture net labels more than one class"
    np.testing.assert_array_equal(labels["free"], labels["torch"])


def test_a_cropped_subtask_segments_the_same_from_both_stores(
    stores: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    """`tsrt -i example_ct_sm.nii.gz -o seg.nii.gz -ta heartchambers_highres --ml`: crop model, then its own model."""
    labels = _labels_from_each_store(stores, ["-i", str(shared_data / "example_ct_sm.nii.gz"), "-ta", SUBTASK], tmp_path)
    np.testing.assert_array_equal(labels["free"], labels["torch"])


def test_total_mr_segments_the_same_from_both_stores(stores: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    """`tsrt -i example_mr_sm.nii.gz -o seg.nii.gz -ta total_mr --ml`: both MR parts."""
    labels = _labels_from_each_store(stores, ["-i", str(shared_data / "example_mr_sm.nii.gz"), "-ta", "total_mr"],
                                     tmp_path)
    np.testing.assert_array_equal(labels["free"], labels["torch"])


def test_plans_written_before_graph_builder_existed_still_load(tmp_path: Path) -> None:
    """A plan written before the field existed reads as the torch exporter's, which wrote it."""
    demo = REPO / "tsrt" / "demo" / "model" / "fold_0.plan.json"
    data = json.loads(demo.read_text())
    data.pop("graph_builder", None)
    (tmp_path / "fold_0.plan.json").write_text(json.dumps(data))
    assert read_plan(tmp_path / "fold_0.plan.json").graph_builder == TORCH_GRAPH_BUILDER
    data.pop("versions")
    (tmp_path / "fold_0.plan.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"lacks \['versions'\]"):  # other fields stay required
        read_plan(tmp_path / "fold_0.plan.json")


# --------------------------------------------------------------------------------------------
# tsrt export without torch
# --------------------------------------------------------------------------------------------


def test_cli_export_without_torch_equals_the_torch_export(tiny_result_folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUTF8": "1"}
    run = _run_cli_without_torch([["export", str(tiny_result_folder), str(tmp_path / "free")]], env, tmp_path)
    assert run["loaded"] == []
    export_model(tiny_result_folder, tmp_path / "torch", progress=False)
    assert sorted(p.name for p in (tmp_path / "free").iterdir()) == sorted(p.name for p in (tmp_path / "torch").iterdir())
    ours, theirs = read_plan(tmp_path / "free" / "fold_0.plan.json"), read_plan(tmp_path / "torch" / "fold_0.plan.json")
    assert {k: v for k, v in ours.to_dict().items() if k not in BUILDER_FIELDS} == {
        k: v for k, v in theirs.to_dict().items() if k not in BUILDER_FIELDS
    }
    x = np.random.default_rng(5).standard_normal((2, 1, *ours.patch_size), dtype=np.float32)
    reference, candidate = _logits(theirs.graph_path, x), _logits(ours.graph_path, x)
    report = compare_logits("tsrt export", reference, candidate, tolerance_fraction=FP32_TOLERANCE_FRACTION,
                            has_regions=False)
    assert report.passed and report.agreement == 1.0, report.summary()


def test_cli_export_options_of_the_torch_exporter_need_verify_with_torch(
    tiny_result_folder: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from tsrt.cli.root import app

    result = CliRunner().invoke(app, ["export", str(tiny_result_folder), str(tmp_path / "out"), "--fp16"])
    assert str(result.exception) == (
        "--fp16 is an option of the torch exporter: add --verify-with-torch "
        "(needs pip install 'tsrt[export]'), or leave it out."
    )
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        app, ["export", str(tiny_result_folder), str(tmp_path / "out"), "--verify-with-torch", "-f", "0"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert read_plan(tmp_path / "out" / "fold_0.plan.json").graph_builder == TORCH_GRAPH_BUILDER


# --------------------------------------------------------------------------------------------
# Hostile and broken checkpoints through `tsrt models import`
# --------------------------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, *, block_torch: bool = False):
    """The console script as a user runs it: one stderr line and an exit code for a TsrtError."""
    prelude = _blocking_prelude() if block_torch else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + "from tsrt.cli.root import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300, env={**os.environ, "PYTHONUTF8": "1", **(env or {})},
    )


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # pickle BINUNICODE


def _splice(checkpoint: Path, payload: bytes) -> None:
    """Put `payload` first in the checkpoint's data.pkl (right after PROTO), as a tampered file would."""
    with zipfile.ZipFile(checkpoint) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in records if n.endswith("/data.pkl"))
    records[name] = records[name][:2] + payload + records[name][2:]
    with zipfile.ZipFile(checkpoint, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, data in records.items():
            archive.writestr(member, data)


def _os_system(sentinel: Path) -> bytes:
    return b"cposix\nsystem\n" + _unicode(f"touch '{sentinel}'") + b"\x85R0"  # GLOBAL, TUPLE1, REDUCE, POP


def _popen(sentinel: Path) -> bytes:
    return b"csubprocess\nPopen\n(" + _unicode("touch") + _unicode(str(sentinel)) + b"l\x85R0"


def _exec(sentinel: Path) -> bytes:
    return b"cbuiltins\nexec\n" + _unicode(f"open({str(sentinel)!r}, 'w').close()") + b"\x85R0"


def _truncate(checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])


def _drop_a_weight(checkpoint: Path) -> None:
    import torch

    content = torch.load(checkpoint, map_location="cpu", weights_only=False)  # the fixture's own file
    content["network_weights"].pop("decoder.seg_layers.2.bias")
    torch.save(content, checkpoint)


def _unknown_architecture(checkpoint: Path) -> None:
    plans_path = checkpoint.parents[1] / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_lab.nets.FancyUNet"
    plans_path.write_text(json.dumps(plans))


#: case -> (how to break the fold-0 checkpoint of total --fast, text the one-line error must hold)
BREAKAGES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "os.system": (lambda ckpt, sentinel: _splice(ckpt, _os_system(sentinel)), "refers to posix.system,"),
    "subprocess.Popen": (lambda ckpt, sentinel: _splice(ckpt, _popen(sentinel)), "refers to subprocess.Popen,"),
    "builtins.exec": (lambda ckpt, sentinel: _splice(ckpt, _exec(sentinel)), "refers to builtins.exec,"),
    "truncated zip": (lambda ckpt, sentinel: _truncate(ckpt), "corrupt or truncated"),
    "missing weight": (lambda ckpt, sentinel: _drop_a_weight(ckpt), "decoder.seg_layers.2.bias"),
    "unknown architecture": (
        lambda ckpt, sentinel: _unknown_architecture(ckpt), "names architecture my_lab.nets.FancyUNet,"
    ),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_checkpoint_stops_the_import_with_one_line(
    case: str, totalseg_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "ts_home"
    source = totalseg_home / "nnunet" / "results" / FAST_MODEL.name
    shutil.copytree(source, home / "nnunet" / "results" / FAST_MODEL.name)
    checkpoint = home / "nnunet" / "results" / FAST_MODEL.result_folder / "fold_0" / "checkpoint_final.pth"
    sentinel = tmp_path / "payload_ran"
    breakage, expected = BREAKAGES[case]
    breakage(checkpoint, sentinel)

    tsrt_home = tmp_path / "tsrt_home"
    result = _cli(
        ["models", "import", "total", "--fast", "--totalseg-home", str(home), "-q"], tmp_path,
        {"TSRT_HOME": str(tsrt_home)}, block_torch=True,
    )
    assert result.returncode == ModelError.exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsrt: error:") and expected in lines[0], result.stderr
    assert sorted(p.name for p in (tsrt_home / "models").rglob("*")) == [], "nothing may be left in the store"
    time.sleep(0.2)  # a Popen'd child would have had time to create it
    assert not sentinel.exists()
