"""Postprocessing: logits -> label map in the reader's voxel grid, as nnU-Net exports predictions.

Order (the reverse of preprocessing): resample logits to the cropped original shape (only when the
image spacing differs from the plan's) -> argmax or region thresholds -> put the crop back into the
full volume -> undo the transpose.
"""

from __future__ import annotations

import logging

import numba
import numpy as np

from tsrt.models.plan import RecordedPlan
from tsrt.pipeline.preprocess import Preprocessed
from tsrt.pipeline.resample import resample_to_shape
from tsrt.pipeline.sliding_window import LabelSink

log = logging.getLogger("tsrt")


def label_dtype(plan: RecordedPlan) -> type:
    """uint8 unless a label number needs more, as nnU-Net writes them."""
    return np.uint8 if max(plan.label_names, default=0) < 255 else np.uint16


@numba.njit(parallel=True, cache=True)
def _argmax_classes(logits: np.ndarray, out: np.ndarray) -> None:
    """out[...] = argmax over axis 0, first maximum on ties (numpy's rule), for (C, X, Y, Z) logits.

    numpy's argmax over the leading axis walks memory with a stride of a whole volume per class;
    this loops classes innermost over contiguous z-rows and runs on every core.
    """
    n_classes, nx, ny, nz = logits.shape
    for i in numba.prange(nx):
        best = np.empty(nz, dtype=np.float32)
        for j in range(ny):
            for k in range(nz):
                best[k] = logits[0, i, j, k]
                out[i, j, k] = 0
            for c in range(1, n_classes):
                for k in range(nz):
                    value = logits[c, i, j, k]
                    if value > best[k]:
                        best[k] = value
                        out[i, j, k] = c


def logits_to_labels(logits: np.ndarray, plan: RecordedPlan) -> np.ndarray:
    """Argmax over classes, or for region models each region where sigmoid > 0.5 in regions_class_order.

    sigmoid(x) > 0.5 is x > 0, so region models need no sigmoid here.
    """
    if plan.has_regions:
        labels = np.zeros(logits.shape[1:], dtype=label_dtype(plan))
        for channel, label in enumerate(plan.regions_class_order or []):
            labels[logits[channel] > 0] = label
        return labels
    labels = np.empty(logits.shape[1:], dtype=label_dtype(plan))
    if logits.ndim == 4 and logits.dtype == np.float32:
        _argmax_classes(logits, labels)
        return labels
    return np.argmax(logits, axis=0).astype(label_dtype(plan))


def softmax_or_sigmoid(logits: np.ndarray, plan: RecordedPlan) -> np.ndarray:
    """The model's inference nonlinearity, in float32."""
    logits = logits.astype(np.float32, copy=False)
    if plan.has_regions:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


class LabelAssembler:
    """Collects finished logit slabs from the sliding window into labels for the cropped volume.

    When no resampling back is needed, each slab is reduced to labels at once, so only labels
    (1-2 bytes a voxel) are kept. Otherwise, or when probabilities are requested, all logits are
    kept (nnU-Net resamples logits, not labels) and the memory this takes is logged.
    """

    def __init__(self, preprocessed: Preprocessed, plan: RecordedPlan, keep_logits: bool = False, half_logits: bool = True):
        self.preprocessed, self.plan = preprocessed, plan
        # nnU-Net's logits are float16, and so is its resampled copy of them; emulate that rounding.
        self.half_logits = half_logits
        shape = preprocessed.data.shape[1:]
        self.keep_logits = keep_logits or preprocessed.needs_resampling_back
        if self.keep_logits:
            gigabytes = plan.num_segmentation_heads * int(np.prod(shape)) * 4 / 1e9
            log.info("keeping whole-volume logits (%.2f GB) to resample them back to the image grid", gigabytes)
            self.logits = np.zeros((plan.num_segmentation_heads, *shape), dtype=np.float32)
        else:
            self.labels = np.zeros(shape, dtype=label_dtype(plan))

    def label_sink(self) -> LabelSink | None:
        """Argmax labels straight from the sliding window, when labels are all this keeps (not for region models)."""
        if self.keep_logits or self.plan.has_regions:
            return None
        return LabelSink(label_dtype(self.plan), self.take_labels)

    def take_labels(self, first_row: int, labels: np.ndarray) -> None:
        self.labels[first_row : first_row + labels.shape[0]] = labels

    def __call__(self, first_row: int, slab: np.ndarray) -> None:
        rows = slice(first_row, first_row + slab.shape[1])
        if self.keep_logits:
            self.logits[:, rows] = slab
        else:
            self.labels[rows] = logits_to_labels(slab, self.plan)

    def cropped_logits(self) -> np.ndarray:
        """Logits resampled to the cropped original shape (the whole-volume path)."""
        pre, resampling = self.preprocessed, self.plan.resampling_probabilities
        resampled = resample_to_shape(
            self.logits,
            pre.shape_after_cropping,
            pre.target_spacing,
            pre.spacing_transposed,
            order=resampling.order,
            order_z=resampling.order_z,
            force_separate_z=resampling.force_separate_z,
            threshold=resampling.anisotropy_threshold,
            out_dtype=np.float16 if self.half_logits else np.float32,
        )
        return resampled.astype(np.float32, copy=False)

    def cropped_labels(self) -> np.ndarray:
        if not self.keep_logits:
            return self.labels
        return logits_to_labels(self.cropped_logits(), self.plan)


def uncrop_and_untranspose(cropped: np.ndarray, preprocessed: Preprocessed, plan: RecordedPlan, fill: float = 0) -> np.ndarray:
    """Put a cropped array (optionally with a leading channel axis) back into the reader's full grid."""
    channels = cropped.shape[: cropped.ndim - len(preprocessed.shape_before_cropping)]
    full = np.full((*channels, *preprocessed.shape_before_cropping), fill, dtype=cropped.dtype)
    box = tuple(slice(a, b) for a, b in preprocessed.bbox)
    full[(*[slice(None)] * len(channels), *box)] = cropped
    lead = list(range(len(channels)))
    return full.transpose([*lead, *[a + len(channels) for a in plan.transpose_backward]])


def probabilities_in_reader_grid(cropped_logits: np.ndarray, preprocessed: Preprocessed, plan: RecordedPlan) -> np.ndarray:
    """Probabilities for the whole image, outside the crop background = 1 (label models) as nnU-Net."""
    probabilities = softmax_or_sigmoid(cropped_logits, plan)
    full = uncrop_and_untranspose(probabilities, preprocessed, plan, fill=0.0)
    if not plan.has_regions:
        outside = np.ones(preprocessed.shape_before_cropping, dtype=bool)
        outside[tuple(slice(a, b) for a, b in preprocessed.bbox)] = False
        full[0][outside.transpose(plan.transpose_backward)] = 1.0
    return full
