"""Install the models a run needs on first use, as TotalSegmentator fetches its weights when a task first needs them.

A model already in the TotalSegmentator home (TOTALSEG_HOME_DIR, else ~/.totalsegmentator) is imported
from there without the network; any other is downloaded (resumable, checksummed; licensed models with the
stored key) and imported. Both paths are torch-free and are the ones `tsrt models import` and
`tsrt models download` take, so a model fetched on first use is the same as one installed by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from tsrt.config import default_totalseg_home
from tsrt.models.download import download_models, model_source
from tsrt.models.registry import ModelPart, load_registry
from tsrt.models.totalseg_import import ImportOutcome, import_models, locate, results_root

LOG = logging.getLogger("tsrt")


def install_missing(
    models: Sequence[ModelPart],
    *,
    store_root: Path | None = None,
    totalseg_home: Path | None = None,
    progress: bool = True,
) -> list[ImportOutcome]:
    """Import `models` from the TotalSegmentator home where it holds them, download the rest.

    A model only partly in the home stops with the import's one-line error (what to delete) rather than
    being downloaded beside it, so the home and the store never disagree silently.
    """
    home = Path(totalseg_home) if totalseg_home is not None else default_totalseg_home()
    results = results_root(home)
    in_home = [model for model in models if results.is_dir() and locate(model, results) is not None]
    to_download = [model for model in models if model not in in_home]
    outcomes: list[ImportOutcome] = []
    if in_home:
        LOG.info(
            "First use: importing %s from the TotalSegmentator home %s.", ", ".join(m.name for m in in_home), home
        )
        outcomes += import_models(in_home, results, store_root=store_root, progress=progress)
    registry = load_registry() if to_download else None
    for model in to_download:
        LOG.info("First use: downloading %s from %s.", model.name, model_source(model, registry))
        outcomes += download_models([model], store_root=store_root, progress=progress)
    return outcomes
