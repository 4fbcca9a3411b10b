"""The opt-in OpenVINO providers on the bundled demo model: fp32 matches ONNX Runtime, bf16 stays close.

Real graphs, real runtimes: the demo model segments a small phantom on ONNX Runtime's CPU provider
and on OpenVINO. float32 OpenVINO must give the same logits within float noise and the same labels;
bfloat16 (only where the CPU has it natively: tsrt refuses emulated bf16) must keep Dice against the
float32 labels above a floor. No timing here: speed belongs in benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'tsrt[openvino]')")

from tsrt.api import segment_image_with_model  # noqa: E402
from tsrt.demo.run import demo_model_dir, dice  # noqa: E402
from tsrt.pipeline.infer import InferenceSettings, load_model  # noqa: E402
from tsrt.demo.phantom import PHANTOM_LABELS, make_phantom  # noqa: E402
from tsrt.engines.providers import choose_provider, native_bf16  # noqa: E402
from tsrt.pipeline.read import Image  # noqa: E402

#: An unseen phantom (training used seeds 0..29), small enough for emulated bf16.
PHANTOM = dict(shape=(80, 72, 64), spacing=(3.0, 3.0, 3.0), seed=4243, vary=True)
#: Mean Dice of bf16 labels vs fp32 labels over organs present in either.
BF16_MIN_DICE = 0.95


@pytest.fixture(scope="module")
def phantom_image() -> Image:
    phantom = make_phantom(**PHANTOM)
    return Image(phantom.image.astype(np.float32), phantom.affine, None, "phantom")


@pytest.fixture(scope="module")
def onnxruntime_labels(phantom_image: Image) -> np.ndarray:
    model = load_model(demo_model_dir(), provider="cpu")
    return segment_image_with_model(phantom_image, model, InferenceSettings(progress=False)).labels


def _labels(phantom_image: Image, provider: str, precision: str = "fp32") -> np.ndarray:
    model = load_model(demo_model_dir(), provider=provider, precision=precision)
    assert (model.provider.name, model.precision_used) == (provider, precision)
    return segment_image_with_model(phantom_image, model, InferenceSettings(progress=False)).labels


def _mean_dice(expected: np.ndarray, actual: np.ndarray) -> float:
    present = [label for label in PHANTOM_LABELS if (expected == label).any() or (actual == label).any()]
    assert present, "the demo model found no organ: the comparison would prove nothing"
    return float(np.mean([dice(expected == label, actual == label) for label in present]))


def test_openvino_fp32_logits_match_onnxruntime():
    """The same graph on the same tile: float32 OpenVINO agrees with ONNX Runtime to float noise."""
    model = load_model(demo_model_dir(), provider="cpu")
    plan = model.plan
    tile = np.random.default_rng(0).standard_normal((1, plan.num_input_channels, *plan.patch_size), dtype=np.float32)
    expected = model.predict_tiles(tile)
    actual = load_model(demo_model_dir(), provider="openvino").predict_tiles(tile)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=2e-3)


def test_openvino_fp32_labels_equal_onnxruntime(phantom_image: Image, onnxruntime_labels: np.ndarray):
    labels = _labels(phantom_image, "openvino")
    assert labels.shape == onnxruntime_labels.shape
    assert np.mean(labels == onnxruntime_labels) >= 0.9999
    assert _mean_dice(onnxruntime_labels, labels) >= 0.999


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(), reason="this CPU has no avx512_bf16 / amx_bf16 flag: bf16 is refused")
def test_openvino_bf16_dice_against_fp32_is_above_the_floor(phantom_image: Image, onnxruntime_labels: np.ndarray):
    labels = _labels(phantom_image, "openvino", "bf16")
    assert _mean_dice(onnxruntime_labels, labels) >= BF16_MIN_DICE


def test_two_runs_of_one_openvino_session_do_not_share_output_buffers():
    """The sliding window may hold one tile's logits while the next runs (mirroring sums them)."""
    model = load_model(demo_model_dir(), provider="openvino")
    plan = model.plan
    rng = np.random.default_rng(1)
    first_tile, second_tile = (rng.standard_normal((1, 1, *plan.patch_size), dtype=np.float32) for _ in range(2))
    first = model.predict_tiles(first_tile)
    kept = first.copy()
    model.predict_tiles(second_tile)
    np.testing.assert_array_equal(first, kept)


def test_compiled_models_are_cached_sealed_and_never_loaded_when_changed(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The second session loads OpenVINO's compiled blob instead of compiling; tsrt seals every blob, and a blob
    whose bytes changed or that has no seal is removed before OpenVINO may read it (then compiled afresh)."""
    from tsrt.engines.providers import cache_seal, sealed_sha256
    from tsrt.models.store import sha256_file

    monkeypatch.setenv("TSRT_HOME", str(tmp_path))
    tile = np.random.default_rng(2).standard_normal((1, 1, *load_model(demo_model_dir(), provider="cpu").plan.patch_size),
                                                    dtype=np.float32)

    def sessions_from_cache() -> tuple[list[bool], np.ndarray]:
        model = load_model(demo_model_dir(), provider="openvino")
        return [s.compiled.get_property("LOADED_FROM_CACHE") for s in model.sessions], model.predict_tiles(tile)

    loaded, expected = sessions_from_cache()
    folder = tmp_path / "cache" / "openvino"
    blobs = sorted(folder.glob("*.blob"))
    assert loaded == [False] and len(blobs) == 1  # the body compiled, its blob written (the head runs on ORT)
    assert all(sealed_sha256(blob) == sha256_file(blob) for blob in blobs)

    loaded, logits = sessions_from_cache()
    assert loaded == [True]
    np.testing.assert_array_equal(logits, expected)

    changed = blobs[0]
    changed.chmod(0o644)
    with changed.open("ab") as blob:
        blob.write(b"\0")
    planted = folder / "1234.blob"
    planted.write_bytes(b"not a compiled model")
    loaded, logits = sessions_from_cache()
    assert loaded == [False]  # the changed blob compiled again
    assert not planted.exists() and all(cache_seal(blob).exists() for blob in folder.glob("*.blob"))
    assert sealed_sha256(changed) == sha256_file(changed)
    np.testing.assert_array_equal(logits, expected)


def test_unknown_provider_lists_the_openvino_choices():
    from tsrt.errors import ProviderError

    with pytest.raises(ProviderError, match="openvino"):
        choose_provider("openvino-int4")


def test_missing_openvino_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    """Without the extra the provider fails with one line saying what to install."""
    import sys

    from tsrt.errors import ProviderError

    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets when it is not installed
    with pytest.raises(ProviderError, match=r"pip install 'tsrt\[openvino\]'"):
        choose_provider("openvino")
