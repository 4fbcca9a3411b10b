"""One exported nnU-Net model on one image: read -> preprocess -> infer -> postprocess -> write.

This is tsrt's equivalent of `nnUNetv2_predict` for any exported model; the TotalSegmentator task
layer calls `predict_array` for each part model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tsrt.pipeline.infer import InferenceSettings, LoadedModel, load_model, predict_streaming
from tsrt.pipeline.postprocess import LabelAssembler, logits_to_labels, probabilities_in_reader_grid, uncrop_and_untranspose
from tsrt.pipeline.preprocess import preprocess

log = logging.getLogger("tsrt")


@dataclass
class Prediction:
    """Labels (and optionally probabilities) in the reader's array order, with stage timings."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: The properties nnU-Net's preprocessing adds (shape_before_cropping, bbox_used_for_cropping,
    #: shape_after_cropping_and_before_resampling), which its probability export pickles.
    cropping: dict[str, Any] = field(default_factory=dict)


def predict_array(
    data: np.ndarray,
    spacing: Sequence[float],
    model: LoadedModel,
    settings: InferenceSettings | None = None,
    *,
    save_probabilities: bool = False,
    overwrite_input: bool = False,
) -> Prediction:
    """Segment a reader-ordered image (channels, *spatial) at `spacing` with an exported model.

    `overwrite_input`: `data` may be normalised in place (tsrt.pipeline.preprocess), for callers that made it.
    """
    settings = settings or InferenceSettings()
    plan = model.plan
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    preprocessed = preprocess(data, spacing, plan, overwrite_input=overwrite_input)
    seconds["preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    network_before = model.seconds_in_network
    assembler = LabelAssembler(
        preprocessed, plan, keep_logits=save_probabilities, half_logits=settings.accumulation == "float16"
    )
    predict_streaming(model, preprocessed, assembler, settings, labels=assembler.label_sink())
    seconds["inference"] = time.perf_counter() - started
    seconds["network"] = model.seconds_in_network - network_before

    started = time.perf_counter()
    probabilities = None
    if save_probabilities:
        cropped_logits = assembler.cropped_logits()
        cropped_labels = logits_to_labels(cropped_logits, plan)
        probabilities = probabilities_in_reader_grid(cropped_logits, preprocessed, plan)
    else:
        cropped_labels = assembler.cropped_labels()
    labels = uncrop_and_untranspose(cropped_labels, preprocessed, plan)
    seconds["postprocess"] = time.perf_counter() - started
    cropping = {
        "shape_before_cropping": tuple(int(n) for n in preprocessed.shape_before_cropping),
        "bbox_used_for_cropping": [[int(start), int(stop)] for start, stop in preprocessed.bbox],
        "shape_after_cropping_and_before_resampling": tuple(int(n) for n in preprocessed.shape_after_cropping),
    }
    return Prediction(
        labels=np.ascontiguousarray(labels), probabilities=probabilities, seconds=seconds, cropping=cropping
    )


__all__ = ["Prediction", "predict_array", "load_model", "InferenceSettings"]
