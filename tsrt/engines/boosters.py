"""TotalSegmentator's xgboost models (contrast phase, modality, body stats), run with xgboost's Booster alone.

Upstream calls them through xgboost's scikit-learn wrappers (XGBRegressor / XGBClassifier), which
refuse to work without scikit-learn. The wrappers' `predict` is a thin layer over the Booster, so
it is reproduced here and the `phase` extra needs only xgboost:

- regression: `inplace_predict` on the float64 feature row, over the trees up to the recorded
  best iteration (all trees when the model has none), float32 out;
- binary classification: the same probability (predict_proba's class-1 column), class 1 when it is
  above 0.5.

It sits with the engines (below the companions and the reports) because both run these models.
tests/companions/test_phase.py, test_modality.py and tests/reports/test_body.py compare the results
with upstream's wrappers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tsrt.errors import require_module

#: Upstream's binary classifiers decide "class 1" above this probability.
CLASS_THRESHOLD = 0.5


def load_boosters(paths: Iterable[Path], feature: str) -> list[Any]:
    """xgboost Boosters from JSON model files (`feature` names the command, for the missing-extra message)."""
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # pandas (via xgboost) logs its thread count at INFO
    xgboost = require_module("xgboost", feature, "phase")
    # One thread: a single feature row gains nothing from more, and idle OpenMP workers spin on a busy machine.
    return [xgboost.Booster(params={"nthread": 1}, model_file=str(path)) for path in paths]


def _iteration_range(booster: Any) -> tuple[int, int]:
    best = booster.attr("best_iteration")
    return (0, int(best) + 1) if best is not None else (0, 0)


def predict_value(booster: Any, features: Sequence[float]) -> np.float32:
    """What XGBRegressor.predict([features])[0] returns (for a binary classifier: predict_proba's class 1)."""
    row = np.asarray([list(features)], dtype=np.float64)
    return booster.inplace_predict(row, iteration_range=_iteration_range(booster), missing=np.nan)[0]


def predict_class(booster: Any, features: Sequence[float]) -> int:
    """What a binary XGBClassifier.predict([features])[0] returns (0 or 1)."""
    return int(predict_value(booster, features) > CLASS_THRESHOLD)
