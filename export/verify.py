"""Verification of an exported graph: ONNX checks, then ONNX Runtime (CPU) against the torch network.

The torch network in float32 is the ground truth for every graph, fp16 graphs included: what matters
is how far the graph the runtime will execute is from the model nnU-Net would run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tsrt.errors import ModelError

#: Allowed max|Δ| of logits as a fraction of the torch logit range (max - min) of the same input.
#: float32: both sides compute the same float32 ops in a different order. Measured max|Δ|: ~1e-6 of
#: the range on small nets, 2e-6..3e-6 on a 6-stage 118-class net at 128^3 (with the two-level
#: InstanceNorm of onnx_export; ORT's native op alone reached 1.03e-3 there), so 1e-3 has >100x margin.
FP32_TOLERANCE_FRACTION = 1e-3
#: float16: unit roundoff is 2**-11 ≈ 4.9e-4 per rounding, and an nnU-Net rounds every activation of
#: 20-40 conv layers (plus the input) before the float32 InstanceNorms re-centre it. Measured max|Δ|:
#: 3e-4..7e-4 of the logit range on small nets, 1.0e-3 (random input) and 5.5e-4 (real CT patch) on a
#: 6-stage 32..320-feature 118-class net at 128^3. 2e-2 of the range leaves a 20x margin over that
#: while still catching a broken graph (an overflowing or miswired graph is off by the whole range).
FP16_TOLERANCE_FRACTION = 2e-2


@dataclass(frozen=True)
class CaseReport:
    """How one input's logits from ONNX Runtime compare with torch's."""

    name: str
    logits_shape: list[int]
    max_abs_diff: float
    logit_range: float
    tolerance: float
    decision: str  # "argmax" (label-based: softmax/argmax) or "sign" (region-based: sigmoid > 0.5)
    agreement: float  # fraction of voxels whose decision agrees
    disagreeing_voxels: int
    confident_disagreements: int  # disagreeing voxels whose torch decision margin exceeds the tolerance

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.confident_disagreements == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        return (
            f"{self.name}: max|Δ| {self.max_abs_diff:.2e} (tol {self.tolerance:.2e}), "
            f"{self.decision} agreement {100 * self.agreement:.3f}% ({self.confident_disagreements} confident misses)"
        )


def check_graph(graph_path: Path, expected_output_shape: Sequence[int | str]) -> None:
    """onnx.checker plus strict shape inference; the inferred output shape must be the expected one.

    `expected_output_shape` uses a string for a symbolic (dynamic) axis.
    """
    import onnx

    try:
        onnx.checker.check_model(str(graph_path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(graph_path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(
            f"The exported graph {graph_path.name} is not valid ONNX ({err}); report this as a tsrt bug."
        ) from None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    inferred = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    expected = list(expected_output_shape)
    symbolic_matches = all(
        isinstance(e, str) == isinstance(i, str) and (isinstance(e, str) or e == i) for e, i in zip(expected, inferred)
    )
    if len(inferred) != len(expected) or not symbolic_matches:
        raise ModelError(
            f"The exported graph {graph_path.name} infers output shape {inferred}, expected {expected}; "
            "report this as a tsrt bug."
        )


def compare_logits(
    name: str, reference: np.ndarray, candidate: np.ndarray, *, tolerance_fraction: float, has_regions: bool
) -> CaseReport:
    """Compare logits of shape (B, C, *spatial) the way the runtime will use them.

    Label-based models take the argmax over channels; region-based ones threshold each channel's
    sigmoid at 0.5, i.e. the logit at 0. A differing decision only fails the check where torch was
    confident: its top-2 logit gap (labels) or |logit| (regions) exceeds the tolerance, since ties within
    the tolerance may flip under any change of summation order.
    """
    if reference.shape != candidate.shape:
        raise ModelError(f"The exported graph returns shape {candidate.shape} where torch returns {reference.shape}.")
    logit_range = float(reference.max() - reference.min())
    tolerance = tolerance_fraction * logit_range
    max_abs_diff = float(np.abs(reference - candidate, dtype=np.float32).max())
    # Margins are only needed where the decisions differ; gathering those voxels keeps the memory of
    # a 118-class 128^3 tile at a few small arrays instead of several copies of the logits.
    if has_regions:
        decision = "sign"
        differs = (reference > 0) != (candidate > 0)
        margin = np.abs(reference[differs])
    elif reference.shape[1] == 1:
        raise ModelError("A label-based model needs at least two output channels (background and one label).")
    else:
        decision = "argmax"
        differs = reference.argmax(axis=1) != candidate.argmax(axis=1)
        logits_at_differing = np.moveaxis(reference, 1, -1)[differs]  # (n, C)
        top2 = np.sort(logits_at_differing, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    disagreeing = int(differs.sum())
    confident = int((margin > tolerance).sum())
    return CaseReport(
        name=name,
        logits_shape=[int(s) for s in candidate.shape],
        max_abs_diff=max_abs_diff,
        logit_range=logit_range,
        tolerance=tolerance,
        decision=decision,
        agreement=1.0 - disagreeing / differs.size,
        disagreeing_voxels=disagreeing,
        confident_disagreements=confident,
    )


def centre_patch(volume: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """Centre crop (and zero-pad, as nnU-Net pads images smaller than the patch) a (C, *spatial) array.

    For a 2d patch size the centre slice of the first spatial axis is taken first, as nnU-Net's 2d
    configurations predict slice by slice along that axis.
    """
    if volume.ndim - 1 == len(patch_size) + 1:
        volume = volume[:, volume.shape[1] // 2]
    spatial = volume.shape[1:]
    crop = tuple(slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p) for s, p in zip(spatial, patch_size))
    cropped = volume[(slice(None), *crop)]
    padding = [(0, 0)] + [((p - c) // 2, p - c - (p - c) // 2) for c, p in zip(cropped.shape[1:], patch_size)]
    return np.pad(cropped, padding).astype(np.float32)
