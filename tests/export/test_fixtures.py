"""The fixture generator writes *real* nnU-Net v2 result folders and TotalSegmentator homes.

Proof is by the real consumers: nnU-Net's own predictor loads and runs every kind of folder,
nnU-Net's own experiment planners write the same plans schema, and official TotalSegmentator
segments a real CT offline from a generated home. Nothing here is mocked.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from tsrt.errors import ModelError  # noqa: E402
from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom  # noqa: E402
from tsrt_export.fixtures import (  # noqa: E402
    DEAD_CLASS_BIAS,
    TOTALSEG_TASKS,
    architecture_from_checkpoint,
    totalseg_models,
    write_result_folder,
)

CHECKPOINT = "fold_0/checkpoint_final.pth"


def _load_checkpoint(folder: Path, fold: int | str = 0) -> dict:
    return torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def _predictor(folder: Path, mirroring: bool = False) -> nnUNetPredictor:
    predictor = nnUNetPredictor(use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=None)
    return predictor


def _phantom_array(shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...], channels: int = 1) -> np.ndarray:
    """A phantom CT in nnU-Net's (c, z, y, x) order; extra channels are scaled copies."""
    phantom = make_phantom(shape=tuple(shape_zyx[::-1]), spacing=tuple(spacing_zyx[::-1]), seed=11)
    image = phantom.image.transpose(2, 1, 0).astype(np.float32)[None]
    return np.concatenate([image * (1.0 - 0.3 * c) for c in range(channels)])


def _predict(predictor: nnUNetPredictor, image: np.ndarray, spacing_zyx) -> np.ndarray:
    return np.asarray(predictor.predict_single_npy_array(image, {"spacing": list(spacing_zyx)}))


# --------------------------------------------------------------------------------------------
# nnU-Net's predictor runs every kind of folder
# --------------------------------------------------------------------------------------------

KINDS = {
    # name: (session fixture or write_result_folder kwargs, image shape zyx, spacing zyx, channels)
    "plain_3d": ("tiny_result_folder", (32, 32, 32), (3.0, 3.0, 3.0), 1),
    "resenc": ("tiny_resenc_result_folder", (32, 32, 32), (3.0, 3.0, 3.0), 1),
    "2d": ("tiny_2d_result_folder", (3, 64, 64), (3.0, 3.0, 3.0), 1),
    "regions": ("tiny_regions_result_folder", (32, 32, 32), (3.0, 3.0, 3.0), 1),
    "two_channels": ({"channel_names": {"0": "CT", "1": "T2"}}, (32, 32, 32), (3.0, 3.0, 3.0), 2),
    "five_folds": ({"folds": range(5)}, (32, 32, 32), (3.0, 3.0, 3.0), 1),
    "anisotropic": ({"spacing": (5.0, 0.7, 0.7), "patch_size": (8, 32, 32)}, (8, 32, 32), (5.0, 0.7, 0.7), 1),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_nnunet_predictor_loads_and_runs(
    kind: str, request: pytest.FixtureRequest, fixture_results_root: Path
) -> None:
    source, shape, spacing, channels = KINDS[kind]
    if isinstance(source, str):
        folder = request.getfixturevalue(source)
    else:
        folder = write_result_folder(fixture_results_root, dataset_id=810 + list(KINDS).index(kind),
                                     dataset_name=kind.title().replace("_", ""), **source)
    predictor = _predictor(folder, mirroring=kind == "plain_3d")  # one kind also runs nnU-Net's mirroring
    seg = _predict(predictor, _phantom_array(shape, spacing, channels), spacing)

    labels = predictor.label_manager
    valid = {0, *predictor.dataset_json.get("regions_class_order", [])} if labels.has_regions else set(labels.all_labels)
    found = set(np.unique(seg).tolist())
    assert seg.shape == shape
    assert found <= valid
    assert len(found) >= 2, f"random weights gave a constant segmentation {found}"

    arch = predictor.configuration_manager.network_arch_init_kwargs
    first_conv = next(m for m in predictor.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    if kind == "plain_3d":
        assert predictor.allowed_mirroring_axes == (0, 1, 2)
    if kind == "resenc":
        assert type(predictor.network).__name__ == "ResidualEncoderUNet"
    if kind == "2d":
        assert predictor.configuration_manager.patch_size == [64, 64] and predictor.allowed_mirroring_axes == (0, 1)
    if kind == "regions":
        assert labels.has_regions and labels.num_segmentation_heads == 3
    if kind == "two_channels":
        assert first_conv.in_channels == 2
        assert predictor.configuration_manager.normalization_schemes == ["CTNormalization", "ZScoreNormalization"]
    if kind == "five_folds":
        first_weights = [p["encoder.stages.0.0.convs.0.conv.weight"] for p in predictor.list_of_parameters]
        assert len(first_weights) == 5
        assert all(not torch.equal(a, b) for i, a in enumerate(first_weights) for b in first_weights[i + 1:])
    if kind == "anisotropic":
        assert arch["kernel_sizes"][0] == [1, 3, 3] and tuple(first_conv.kernel_size) == (1, 3, 3)
        assert [s[0] for s in arch["strides"]] == [1, 1, 1] and arch["strides"][1] == [1, 2, 2]


# --------------------------------------------------------------------------------------------
# Same schema as nnU-Net writes
# --------------------------------------------------------------------------------------------


def test_checkpoint_has_the_trainers_layout(tiny_result_folder: Path) -> None:
    checkpoint = _load_checkpoint(tiny_result_folder)
    assert set(checkpoint) == {
        "network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
        "init_args", "trainer_name", "inference_allowed_mirroring_axes",
    }
    trainer_init = set(inspect.signature(nnUNetTrainer.__init__).parameters) - {"self"}
    assert set(checkpoint["init_args"]) == trainer_init
    assert checkpoint["init_args"]["plans"] == json.loads((tiny_result_folder / "plans.json").read_text())
    assert checkpoint["init_args"]["dataset_json"] == json.loads((tiny_result_folder / "dataset.json").read_text())
    assert set(checkpoint["logging"]) == set(LocalLogger().my_fantastic_logging)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    # Saved as training saves it: deep-supervision heads for every decoder stage are in the weights.
    n_stages = checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"]
    seg_layers = {k.split(".")[2] for k in checkpoint["network_weights"] if k.startswith("decoder.seg_layers.")}
    assert seg_layers == {str(i) for i in range(n_stages - 1)}


_PLANNER_SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path

    def main():
        work, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[var] = str(work / var)  # before nnunetv2 is imported: it reads them once
        import numpy as np, SimpleITK as sitk
        from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as default
        from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as resenc
        out = {}
        for folder, planner_name in jobs:
            folder = Path(folder)
            dataset = folder.parent.name
            raw, pre = work / "nnUNet_raw" / dataset, work / "nnUNet_preprocessed" / dataset
            (raw / "imagesTr").mkdir(parents=True)
            (raw / "labelsTr").mkdir()
            pre.mkdir(parents=True)
            shutil.copy(folder / "dataset.json", raw / "dataset.json")
            shutil.copy(folder / "dataset_fingerprint.json", pre / "dataset_fingerprint.json")
            channels = json.loads((folder / "dataset.json").read_text())["channel_names"]
            for case in ("case_a", "case_b"):
                for channel in channels:
                    image = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16))
                    sitk.WriteImage(image, str(raw / "imagesTr" / f"{case}_{int(channel):04d}.nii.gz"))
                label = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.uint8))
                sitk.WriteImage(label, str(raw / "labelsTr" / f"{case}.nii.gz"))
            planner = getattr(default, planner_name, None) or getattr(resenc, planner_name)
            out[str(folder)] = planner(dataset).plan_experiment()
        print(json.dumps(out))

    if __name__ == "__main__":
        main()
    """
)

#: Plans entries that are fixed by nnU-Net's planners (not by dataset size or GPU memory).
_SCHEMA_VALUES = ("image_reader_writer", "label_manager", "transpose_forward", "transpose_backward",
                  "experiment_planner_used", "foreground_intensity_properties_per_channel", "dataset_name")
_CONFIG_SCHEMA_VALUES = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                         "use_mask_for_norm", "resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities",
                         "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                         "resampling_fn_probabilities_kwargs")
_ARCH_SCHEMA_VALUES = ("conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
                       "nonlin", "nonlin_kwargs")


def test_plans_have_the_schema_nnunets_planners_write(
    tiny_result_folder: Path, tiny_resenc_result_folder: Path, tmp_path: Path
) -> None:
    """nnU-Net's ExperimentPlanner / nnUNetPlannerResEncM plan the fixture's own fingerprint and dataset.json."""
    jobs = [[str(tiny_result_folder), "ExperimentPlanner"], [str(tiny_resenc_result_folder), "nnUNetPlannerResEncM"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    run = subprocess.run([sys.executable, "-c", _PLANNER_SCRIPT, str(tmp_path), json.dumps(jobs)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = json.loads(run.stdout.strip().splitlines()[-1])
    for folder, _ in jobs:
        ours, theirs = json.loads((Path(folder) / "plans.json").read_text()), reference[folder]
        assert set(ours) == set(theirs)
        for key in _SCHEMA_VALUES:
            assert ours[key] == theirs[key], key
        config, their_config = ours["configurations"]["3d_fullres"], theirs["configurations"]["3d_fullres"]
        assert list(config) == list(their_config)
        for key in _CONFIG_SCHEMA_VALUES:
            assert config[key] == their_config[key], key
        arch, their_arch = config["architecture"], their_config["architecture"]
        assert arch["network_class_name"] == their_arch["network_class_name"]
        assert arch["_kw_requires_import"] == their_arch["_kw_requires_import"]
        assert list(arch["arch_kwargs"]) == list(their_arch["arch_kwargs"])
        for key in _ARCH_SCHEMA_VALUES:
            assert arch["arch_kwargs"][key] == their_arch["arch_kwargs"][key], key


# --------------------------------------------------------------------------------------------
# Determinism and argument checks
# --------------------------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_checkpoints(tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    first = write_result_folder(tmp_path / "a", seed=7, folds=(0, 1))
    second = write_result_folder(tmp_path / "b", seed=7, folds=(0, 1))
    other_seed = write_result_folder(tmp_path / "c", seed=8, folds=(0,))
    assert torch.equal(torch.get_rng_state(), rng_before), "building fixtures must not move the caller's RNG"
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weights = {
        "seed7_fold0": _load_checkpoint(first, 0)["network_weights"],
        "seed7_fold1": _load_checkpoint(first, 1)["network_weights"],
        "seed8_fold0": _load_checkpoint(other_seed, 0)["network_weights"],
    }
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.equal(weights["seed7_fold0"][key], weights["seed7_fold1"][key])
    assert not torch.equal(weights["seed7_fold0"][key], weights["seed8_fold0"][key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": (32, 32, 34)}, "not divisible"),
        ({"n_stages": 6}, "at most"),
        ({"architecture": "UNetPlusPlus"}, "Unknown architecture"),
        ({"features": (4, 8)}, "one per stage"),
        ({"labels": {"background": 0, "a": [1, 2], "b": 2}}, "regions_class_order"),
        ({"source_checkpoint": Path("/nonexistent/checkpoint_final.pth")}, "does not exist"),
    ],
)
def test_bad_arguments_raise_model_error(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=message):
        write_result_folder(tmp_path, **kwargs)


# --------------------------------------------------------------------------------------------
# Intensity-band weights: a real network that labels voxels by intensity
# --------------------------------------------------------------------------------------------

BAND_LABELS = {"background": 0, "brain": 1, "skull": 2, "unused": 3}
BANDS = {"brain": (-300.0, 600.0), "skull": (600.0, float("inf"))}


@pytest.mark.parametrize(("channel", "scheme"), [("CT", "CTNormalization"), ("MR", "NoNormalization")])
def test_band_weights_label_voxels_by_intensity_through_nnunets_predictor(
    channel: str, scheme: str, tmp_path: Path
) -> None:
    """Slabs of known intensity, several tiles wide, come out as their band's class; `unused` is never predicted.

    MR: the same bands in the image's own units (no per-image z-score, which would move them).
    """
    folder = write_result_folder(tmp_path, labels=BAND_LABELS, n_stages=3, features=(4, 8, 16), patch_size=(32, 32, 32),
                                 channel_names={"0": channel}, intensity_bands=BANDS)
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["norm_op"] is None
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == [scheme]
    hu = np.array([-1000, -400, -250, 34, 550, 650, 1100, 2500], np.float32)
    expected = [0, 0, 1, 1, 1, 2, 2, 2]
    image = np.repeat(hu, 10)[:, None, None] * np.ones((1, 70, 50), np.float32)  # (z, y, x): 80 x 70 x 50
    seg = _predict(_predictor(folder), image[None], (1.5, 1.5, 1.5))
    for index, label in enumerate(expected):
        slab = seg[index * 10 + 2 : index * 10 + 8]  # away from the slab edges (band edges are sharp, not voxels)
        assert np.all(slab == label), (hu[index], np.unique(slab))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"intensity_bands": {"liver": (0.0, 100.0)}}, "no class for"),
        ({"intensity_bands": {"brain": (-300.0, 0.0), "skull": (100.0, 200.0)}, "features": (2, 4, 8)}, "4 band edges need at least 8"),
        ({"intensity_bands": {"liver": (0.0, 100.0)}, "labels": {"background": 0, "liver": [1, 2], "tumour": 2},
          "regions_class_order": [1, 2]}, "regular \\(non-region\\) labels"),
    ],
)
def test_band_weights_refuse_what_they_cannot_build(kwargs: dict, message: str, tmp_path: Path) -> None:
    arguments = {"labels": BAND_LABELS, "n_stages": 3, "patch_size": (32, 32, 32), **kwargs}
    with pytest.raises(ModelError, match=message):
        write_result_folder(tmp_path, **arguments)


# --------------------------------------------------------------------------------------------
# "Confident" weights from a trained checkpoint
# --------------------------------------------------------------------------------------------

SOURCE_LABELS = {"background": 0, "spleen": 1, "kidney_right": 2, "liver": 3, "aorta": 4}
#: Requested classes -> expected source row: liver and spleen by name, then pancreas and stomach take
#: the unused rows (kidney_right, aorta) in order; colon is left without a row.
TARGET_LABELS = {"background": 0, "liver": 1, "pancreas": 2, "spleen": 3, "stomach": 4, "colon": 5}
EXPECTED_ROWS = {0: 0, 1: 3, 2: 2, 3: 1, 4: 4, 5: None}


@pytest.fixture(scope="module")
def random_source(fixture_results_root: Path) -> Path:
    folder = write_result_folder(fixture_results_root, dataset_id=830, dataset_name="RemapSource",
                                 labels=SOURCE_LABELS, seed=5)
    return folder / CHECKPOINT


def _seg_layer_keys(weights: dict) -> list[str]:
    return [k for k in weights if k.startswith("decoder.seg_layers.")]


def _assert_relabelled(source: Path, target: Path, rows: dict[int, int | None], image: np.ndarray, spacing) -> np.ndarray:
    """The target network's logits are the source's rows (exactly) and its segmentation the source's, relabelled.

    nnU-Net 2.8.1 accumulates tile logits in float16, so near-ties can break differently once rows are
    reordered: the predictor-level comparison allows a few such voxels, the logit comparison allows none.
    """
    source_predictor, target_predictor = _predictor(source), _predictor(target)
    probe = torch.randn(1, image.shape[0], *source_predictor.configuration_manager.patch_size,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source_logits = source_predictor.network.eval()(probe)
        target_logits = target_predictor.network.eval()(probe)
    for target_row, source_row in rows.items():
        if source_row is None:
            assert torch.all(target_logits[0, target_row] == DEAD_CLASS_BIAS)
        else:
            assert torch.equal(target_logits[0, target_row], source_logits[0, source_row])

    source_seg = _predict(source_predictor, image, spacing)
    target_seg = _predict(target_predictor, image, spacing)
    relabel = np.zeros(max(r for r in rows.values() if r is not None) + 1, dtype=target_seg.dtype)
    for target_row, source_row in rows.items():
        if source_row is not None:
            relabel[source_row] = target_row
    assert np.mean(target_seg == relabel[source_seg]) > 0.995
    assert not set(np.unique(target_seg).tolist()) & {t for t, s in rows.items() if s is None}
    return target_seg


def test_architecture_from_checkpoint_reads_recipe_and_rows(random_source: Path) -> None:
    source = architecture_from_checkpoint(random_source)
    assert source.architecture == "PlainConvUNet" and source.n_stages == 3 and source.features == [4, 8, 16]
    assert source.num_input_channels == 1 and not source.has_regions
    assert source.head_names == list(SOURCE_LABELS)


def test_confident_remap_copies_backbone_and_assigns_rows(random_source: Path, fixture_results_root: Path) -> None:
    target = write_result_folder(fixture_results_root, dataset_id=831, dataset_name="RemapTarget",
                                 labels=TARGET_LABELS, source_checkpoint=random_source)
    source_weights = torch.load(random_source, map_location="cpu", weights_only=False)["network_weights"]
    target_weights = _load_checkpoint(target)["network_weights"]
    assert set(target_weights) == set(source_weights)
    for key in set(target_weights) - set(_seg_layer_keys(target_weights)):
        assert torch.equal(target_weights[key], source_weights[key]), key
    for key in _seg_layer_keys(target_weights):
        for target_row, source_row in EXPECTED_ROWS.items():
            if source_row is not None:
                assert torch.equal(target_weights[key][target_row], source_weights[key][source_row]), key
            elif key.endswith("weight"):
                assert not target_weights[key][target_row].any()
            else:
                assert target_weights[key][target_row] == DEAD_CLASS_BIAS

    _assert_relabelled(random_source.parents[1], target, EXPECTED_ROWS, _phantom_array((32, 32, 32), (3.0, 3.0, 3.0)),
                       (3.0, 3.0, 3.0))


def test_confident_class_rows_pick_the_trained_row(random_source: Path, fixture_results_root: Path) -> None:
    """class_rows wins over names: colon takes liver's row, so liver falls back to the first unused row."""
    target = write_result_folder(fixture_results_root, dataset_id=833, dataset_name="RemapRows", labels=TARGET_LABELS,
                                 source_checkpoint=random_source, class_rows={"colon": "liver"})
    source_weights = torch.load(random_source, map_location="cpu", weights_only=False)["network_weights"]
    target_weights = _load_checkpoint(target)["network_weights"]
    # colon <- liver (3); spleen by name (1); liver, pancreas, stomach take the unused rows 2, 4 in order.
    expected = {5: 3, 3: 1, 1: 2, 2: 4}
    for key in _seg_layer_keys(target_weights):
        for target_row, source_row in expected.items():
            assert torch.equal(target_weights[key][target_row], source_weights[key][source_row]), (key, target_row)
    with pytest.raises(ModelError, match="no row for"):
        write_result_folder(fixture_results_root, dataset_id=834, dataset_name="RemapBad", labels=TARGET_LABELS,
                            source_checkpoint=random_source, class_rows={"colon": "brain"})


def test_confident_region_heads_are_log_odds_against_background(
    random_source: Path, fixture_results_root: Path
) -> None:
    target = write_result_folder(
        fixture_results_root, dataset_id=832, dataset_name="RemapRegions", source_checkpoint=random_source,
        labels={"background": 0, "spleen_or_liver": [1, 2], "liver": 2}, regions_class_order=(1, 2),
    )
    source_weights = torch.load(random_source, map_location="cpu", weights_only=False)["network_weights"]
    target_weights = _load_checkpoint(target)["network_weights"]
    for key in _seg_layer_keys(target_weights):
        background = source_weights[key][0]
        # "liver" matches by name (row 3); "spleen_or_liver" takes the first unused row (spleen, 1).
        torch.testing.assert_close(target_weights[key][1], source_weights[key][3] - background)
        torch.testing.assert_close(target_weights[key][0], source_weights[key][1] - background)


def test_confident_remap_refuses_a_different_network(random_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="n_stages 4"):
        write_result_folder(tmp_path, n_stages=4, source_checkpoint=random_source)
    with pytest.raises(ModelError, match="input channels"):
        write_result_folder(tmp_path, channel_names={"0": "CT", "1": "CT"}, source_checkpoint=random_source)


def test_confident_weights_from_the_demo_checkpoint(demo_checkpoint: Path, tmp_path: Path) -> None:
    """The trained demo model, remapped to TotalSegmentator-style classes, still finds the phantom's organs."""
    source = architecture_from_checkpoint(demo_checkpoint)
    assert source.architecture == "PlainConvUNet" and source.n_stages == 4 and source.features == [8, 16, 32, 64]
    assert source.head_names == ["background", *PHANTOM_LABELS.values()]
    target_labels = {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4,
                     "liver": 5, "stomach": 6, "pancreas": 7, "aorta": 8}
    common = {"spacing": source.spacing, "patch_size": source.patch_size, "source_checkpoint": demo_checkpoint}
    identity = write_result_folder(tmp_path, dataset_id=840, dataset_name="DemoIdentity",
                                   labels={"background": 0, **{n: v for v, n in PHANTOM_LABELS.items()}}, **common)
    target = write_result_folder(tmp_path, dataset_id=841, dataset_name="DemoTotalSeg", labels=target_labels, **common)

    phantom = make_phantom(shape=(96, 80, 64), spacing=(3.0, 3.0, 3.0), seed=4243, vary=True)
    image = phantom.image.transpose(2, 1, 0)[None].astype(np.float32)
    # Matched by name: spleen, kidney_right, kidney_left, liver, aorta; the unused trained rows
    # (lung_left, lung_right, spine) go in order to gallbladder, stomach, pancreas.
    demo_label = {name: value for value, name in PHANTOM_LABELS.items()}
    unmatched = {"gallbladder": "lung_left", "stomach": "lung_right", "pancreas": "spine"}
    rows = {0: 0, **{value: demo_label[unmatched.get(name, name)] for name, value in target_labels.items() if value}}
    target_seg = _assert_relabelled(identity, target, rows, image, (3.0, 3.0, 3.0))
    truth = phantom.labels.transpose(2, 1, 0)
    liver = (target_seg == target_labels["liver"], truth == demo_label["liver"])
    assert 2 * (liver[0] & liver[1]).sum() / (liver[0].sum() + liver[1].sum()) > 0.7


# --------------------------------------------------------------------------------------------
# TotalSegmentator homes
# --------------------------------------------------------------------------------------------


def test_totalseg_models_follow_totalsegmentators_spacings() -> None:
    spacing = {key: [m.spacing for m in totalseg_models(key)] for key in TOTALSEG_TASKS}
    assert spacing["total"] == [[1.5] * 3] * 5 and spacing["total_mr"] == [[1.5] * 3] * 2
    assert spacing["total_fast"] == [[3.0] * 3] and spacing["total_mr_fast"] == [[3.0] * 3]
    assert spacing["total_fastest"] == [[6.0] * 3] and spacing["body_fast"] == [[6.0] * 3]
    assert [m.task_id for m in totalseg_models("total")] == [291, 292, 293, 294, 295]
    assert len(totalseg_models("total_fast")[0].labels) == 118  # background + TotalSegmentator's 117 classes


_TOTALSEG_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from pathlib import Path

    attempts = []
    _getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect

    def no_lookup(host, *args, **kwargs):
        attempts.append(f"lookup {host}")
        raise socket.gaierror("network disabled in this test")

    def no_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address}")
            raise OSError("network disabled in this test")
        return _connect(self, address)

    socket.getaddrinfo, socket.socket.connect = no_lookup, no_connect

    def main():
        ct, out, task_keys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        # TotalSegmentator resolves each task's model folder exactly like this before predicting.
        from totalsegmentator.config import setup_nnunet
        setup_nnunet()
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        from totalsegmentator.python_api import get_task_config, totalsegmentator
        from totalsegmentator.nifti_ext_header import load_multilabel_nifti
        import numpy as np
        missing = []
        for task, mode in task_keys:
            config = get_task_config(task, fast=mode == "fast", fastest=mode == "fastest", quiet=True,
                                     plans="nnUNetPlans")
            for task_id in config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]:
                folder = get_output_folder(task_id, config["trainer"], config["plans"], config["model"])
                for fold in config["folds"]:
                    if not (Path(folder) / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                        missing.append(f"{task}/{mode}: {folder}/fold_{fold}")
        totalsegmentator(ct, out, ml=True, fast=True, device="cpu", quiet=True, nr_thr_saving=1)
        seg, label_map = load_multilabel_nifti(out)
        from totalsegmentator.map_to_binary import class_map
        print(json.dumps({
            "missing": missing,
            "shape": list(seg.shape),
            "found": sorted(int(v) for v in np.unique(np.asanyarray(seg.dataobj))),
            "label_map": {str(k): v for k, v in label_map.items()},
            "class_map_total": {str(k): v for k, v in class_map["total"].items()},
            "network_attempts": attempts,
        }))

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_official_totalsegmentator_runs_fast_offline(totalseg_home: Path, shared_data: Path, tmp_path: Path) -> None:
    """TotalSegmentator --fast on the real small CT, with every network lookup and connection refused."""
    import nibabel as nib

    pytest.importorskip("totalsegmentator")
    ct = shared_data / "example_ct_sm.nii.gz"
    home = tmp_path / "home"
    shutil.copytree(totalseg_home, home)  # TotalSegmentator writes its prediction counter into config.json
    env = {k: v for k, v in os.environ.items() if k != "TOTALSEG_WEIGHTS_PATH" and not k.startswith("nnUNet_")}
    env["TOTALSEG_HOME_DIR"] = str(home)
    script = tmp_path / "run_totalsegmentator.py"  # a file, so spawned nnU-Net workers can re-import __main__
    script.write_text(_TOTALSEG_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(ct), str(tmp_path / "seg.nii.gz"), json.dumps(list(TOTALSEG_TASKS.values()))],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["network_attempts"] == []
    assert result["missing"] == [], "TotalSegmentator would download these"
    assert result["label_map"] == result["class_map_total"] and len(result["label_map"]) == 117
    assert result["shape"] == list(nib.load(ct).shape)
    assert len(result["found"]) > 2
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False
