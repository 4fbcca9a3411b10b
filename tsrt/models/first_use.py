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


# --------------------------------------------------------------------------------------------
# Store resources (tsrt.models.resources) that TotalSegmentator keeps in its weights folder
# --------------------------------------------------------------------------------------------


def resource_converter(name: str):
    """tsrt_export's `import_resource` (the converters live in the export toolchain), or one line saying how to get it."""
    from tsrt.errors import ModelError, is_missing
    from tsrt.models.resources import import_hint, resource_spec

    try:
        from tsrt_export.import_classifiers import import_resource
    except ModuleNotFoundError as error:
        if not is_missing(error, "tsrt_export"):
            raise
        spec = resource_spec(name)
        raise ModelError(
            f"{spec.what.capitalize()} are converted by tsrt's export toolchain, which is not installed "
            f"(pip install '.[export]' ./export): {import_hint(spec)}."
        ) from None
    return import_resource


def import_resource_from_home(name: str, totalseg_home: Path | None = None, store_root: Path | None = None) -> Path:
    """Convert a resource from TotalSegmentator's home (or its weights folder) into the store; return its folder."""
    home = Path(totalseg_home) if totalseg_home is not None else default_totalseg_home()
    return resource_converter(name)(name, home, store_root)


def download_resource(name: str, store_root: Path | None = None, *, progress: bool = True) -> Path:
    """Download a resource as TotalSegmentator does (release zip or license server), convert it into the store."""
    from tsrt.models.download import scratch_dir, download_resource_zip, unpack
    from tsrt.models.resources import resource_spec

    spec = resource_spec(name)
    convert = resource_converter(name)  # before the download: a missing toolchain must not cost the transfer
    archive = download_resource_zip(spec, progress=progress)
    with scratch_dir() as weights:
        target = weights / Path(spec.totalseg_folder).parent
        target.mkdir(parents=True, exist_ok=True)
        unpack(archive, target)
        folder = convert(name, weights, store_root)
    archive.unlink()
    return folder


def ensure_resource(
    name: str,
    store_root: Path | None = None,
    *,
    totalseg_home: Path | None = None,
    offline: bool = False,
    progress: bool = True,
) -> None:
    """Before any image is read, install a missing resource: imported from the TotalSegmentator home, else downloaded.

    Offline (or for resources that come with the totalsegmentator package) nothing is fetched: the
    run then stops where the resource is read, with one line naming the command that installs it.
    """
    from tsrt import config
    from tsrt.models.download import resource_source
    from tsrt.models.resources import MANIFEST, resource_dir, resource_spec

    spec = resource_spec(name)
    if (resource_dir(name, store_root) / MANIFEST).is_file() or spec.totalseg_folder is None:
        return
    if offline or config.offline():
        return
    home = Path(totalseg_home) if totalseg_home is not None else default_totalseg_home()
    if (results_root(home) / spec.totalseg_folder).is_dir():
        LOG.info("First use: importing %s from the TotalSegmentator home %s.", name, home)
        import_resource_from_home(name, home, store_root)
    else:
        LOG.info("First use: downloading %s from %s.", name, resource_source(spec))
        download_resource(name, store_root, progress=progress)
