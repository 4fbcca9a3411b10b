"""The task registry: models.toml is exactly what the installed TotalSegmentator implies.

The committed file is regenerated and compared byte for byte; the parsed registry is then checked
against TotalSegmentator's own code paths (get_task_config, class maps, download table), which are
the oracle here.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tsrt.models.registry import REGISTRY_PATH, TaskError, get_task, list_tasks, load_registry

REPO = Path(__file__).resolve().parents[2]

totalsegmentator = pytest.importorskip("totalsegmentator", reason="the registry oracle is TotalSegmentator itself")


@pytest.fixture(scope="module")
def generated() -> str:
    from tsrt_export.generate_models_toml import generate

    return generate()


@pytest.fixture(scope="module")
def task_config(tmp_path_factory):
    """TotalSegmentator's get_task_config, with a (syntactically valid) license so licensed tasks resolve."""
    home = tmp_path_factory.mktemp("totalseg_home")
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_TEST", "license_number": "aca_" + "X" * 14}))
    mp = pytest.MonkeyPatch()
    mp.setenv("TOTALSEG_HOME_DIR", str(home))
    from totalsegmentator.python_api import get_task_config

    yield lambda task, **kw: get_task_config(task, quiet=True, plans="nnUNetPlans", **kw)
    mp.undo()


def test_committed_registry_is_regenerated_byte_for_byte(generated: str) -> None:
    assert REGISTRY_PATH.read_text() == generated, "run: python -m tsrt_export.generate_models_toml"


def test_generation_is_deterministic(generated: str) -> None:
    from tsrt_export.generate_models_toml import generate

    assert generate() == generated


def test_check_mode_reports_a_stale_file(tmp_path: Path, generated: str) -> None:
    from tsrt_export.generate_models_toml import main

    stale = tmp_path / "models.toml"
    stale.write_text(generated.replace('step_size = 0.8', 'step_size = 0.5', 1))
    assert main(["--check", "--output", str(stale)]) == 1
    stale.write_text(generated)
    assert main(["--check", "--output", str(stale)]) == 0


def test_top_level_symlink_points_at_package_data() -> None:
    link = REPO / "models.toml"
    assert link.is_symlink() and link.resolve() == REGISTRY_PATH.resolve()


def test_tasks_are_totalsegmentators_selectable_tasks_with_weights() -> None:
    from totalsegmentator.registry import TASKS

    registry = load_registry()
    assert list_tasks() == [t for t in TASKS if t not in registry.skipped_tasks]
    assert set(registry.skipped_tasks) == {"test", "total_highres_test"}
    for name in ("total", "total_mr", "lung_vessels", "coronary_arteries", "heartchambers_highres", "teeth"):
        assert name in list_tasks()


def test_total_parts_partition_the_117_classes() -> None:
    from totalsegmentator.map_to_binary import class_map

    task = get_task("total")
    assert [p.dataset_id for p in task.parts] == [291, 292, 293, 294, 295]
    names = [name for part in task.parts for name in part.classes.values()]
    assert sorted(names) == sorted(class_map["total"].values())
    assert len(names) == len(set(names)) == 117
    inverse = {name: label for label, name in task.classes.items()}
    assert dict(task.classes) == class_map["total"]
    assert {inverse[n] for n in names} == set(range(1, 118))


def test_every_mode_matches_totalsegmentators_task_config(task_config) -> None:
    from totalsegmentator.map_to_binary import class_map

    registry = load_registry()
    for name in list_tasks():
        for mode in registry.modes(name):
            task = get_task(name, fast=mode == "fast", fastest=mode == "fastest")
            config = task_config(name, fast=mode == "fast", fastest=mode == "fastest")
            ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
            assert [p.dataset_id for p in task.parts] == ids, (name, mode)
            resample = config["resample"]
            if isinstance(resample, float):
                resample = [resample] * 3
            xyz = None if resample is None else tuple(float(r) for r in resample)
            folds = None if config["folds"] is None else tuple(config["folds"])
            for part in task.parts:
                assert (part.trainer, part.configuration) == (config["trainer"], config["model"])
                assert part.plans == "nnUNetPlans"
                assert part.resample_mm == xyz and part.folds == folds, (name, mode)
                assert part.mirroring is False
                expected_step = 0.8 if name in ("total", "total_v3", "total_mr") else 0.5
                assert part.step_size == expected_step, (name, part.name)
            assert dict(task.classes) == class_map[name]
            merged = {n for part in task.parts for n in part.classes.values()}
            assert set(task.classes.values()) <= merged
            if task.crop is not None:
                assert list(task.crop.classes) == list(config["crop"])


def test_crops_follow_python_api() -> None:
    lung = get_task("lung_vessels")  # robust_crop=True in its config: the 3 mm model
    assert lung.crop.source_model.dataset_id == 297 and lung.crop.margin_mm == (20.0, 20.0, 20.0)
    bleed = get_task("cerebral_bleed")  # default: 6 mm model, margin forced to 20 mm despite crop_addon 3
    assert bleed.crop.source_model.dataset_id == 298 and bleed.crop.robust_source_model.dataset_id == 297
    assert get_task("pleural_pericard_effusion").crop.margin_mm == (20.0, 20.0, 20.0)  # its crop_addon 50 is overridden
    assert get_task("liver_segments_mr").crop.source_model.dataset_id == 852
    assert get_task("abdominal_muscles").crop.source_model.dataset_id == 300  # body_trunc comes from the body model
    teeth = get_task("teeth")
    assert teeth.crop.source_task == "craniofacial_structures" and teeth.crop.margin_mm == (10.0, 10.0, 10.0)
    assert [m.dataset_id for m in teeth.required_models] == [113, 115, 298]
    heart = get_task("heartchambers_highres")
    assert heart.crop.remove_outside == ("heart", "aorta", "inferior_vena_cava")
    assert heart.crop.remove_outside_dilation_mm == 10.0
    total = get_task("total")
    assert total.roi_subset_crop.source_model.dataset_id == 298 and total.body_seg.model.dataset_id == 300
    assert get_task("total_mr").roi_subset_crop.source_model.dataset_id == 852
    assert get_task("total_mr").body_seg is None
    assert {m.dataset_id for m in total.optional_models} == {297, 298, 300}


def test_auxiliary_labels_and_helpers() -> None:
    from totalsegmentator.map_to_binary import class_map

    bones = get_task("appendicular_bones")
    assert bones.remove_auxiliary_labels == tuple(sorted(class_map["appendicular_bones_auxiliary"]))
    assert set(bones.remove_auxiliary_labels) <= set(bones.parts[0].classes)
    assert get_task("appendicular_bones_mr").remove_auxiliary_labels == ()  # TotalSegmentator has no map for it
    refined = get_task("vertebrae_pp_refined")
    helpers = [(h.role, h.model.dataset_id, h.params["dilation_mm"]) for h in refined.helpers]
    assert helpers == [("vertebrae_body_mask", 305, 2.0)]
    assert [s.step for s in refined.postprocess] == ["vertebrae_pp", "refine_with_vertebrae_body_mask"]
    body_steps = [s.step for s in get_task("body").postprocess]
    assert body_steps == ["keep_largest_blob", "remove_small_blobs", "derived_masks"]


def test_download_addresses_match_totalsegmentators_table() -> None:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import commercial_models

    registry = load_registry()
    for model in registry.models.values():
        info = TASK_ID_WEIGHTS_CONFIGS[model.dataset_id]
        assert model.name == info["foldername"]
        assert model.result_folder.startswith(f"{model.name}/{model.trainer}__")
        if model.license:
            assert commercial_models[model.license_task] == model.dataset_id and model.url is None
        else:
            release = "https://github.com/wasserth/TotalSegmentator/releases/download"
            assert model.url == f"{release}/{info['version']}/{model.name}.zip"
    assert registry.license.server_url == "https://backend.totalsegmentator.com:443/"
    assert registry.license.download_endpoint == "download_weights"
    assert registry.license.validate_endpoint == "is_valid_license_number"
    assert (registry.license.key_prefix, registry.license.key_length) == ("aca_", 18)
    assert registry.totalsegmentator_version == importlib.metadata.version("TotalSegmentator")


def test_modes_and_flags() -> None:
    assert get_task("total", fast=True).parts[0].dataset_id == 297
    assert get_task("total", fastest=True).parts[0].dataset_id == 298
    assert get_task("total", fast=True, fastest=True).mode == "fast"  # as TotalSegmentator: fast wins
    assert get_task("body", fastest=True).mode == "fast"  # no fastest mode: falls back to fast
    assert get_task("vertebrae_mr", fast=True).mode == "normal"  # TotalSegmentator ignores --fast here
    with pytest.raises(TaskError, match="no --fast mode"):
        get_task("cerebral_bleed", fast=True)
    with pytest.raises(TaskError, match="Unknown task 'totl'"):
        get_task("totl")
    with pytest.raises(TaskError, match="not available in tsrt"):
        get_task("total_highres_test")


def test_runtime_modules_import_without_torch_or_totalsegmentator() -> None:
    code = (
        "import sys, tsrt.models.registry, tsrt.models.store, tsrt.models.download, tsrt.cli.models\n"
        "tsrt.models.registry.get_task('total').required_models\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nnunetv2', 'totalsegmentator'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
