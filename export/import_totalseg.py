"""TotalSegmentator import with the torch exporter: tsrt.models.totalseg_import, graphs verified against torch.

The import itself (finding result folders, checking them, staging, installing into the store) lives in the
runtime, which exports torch-free. This module binds the torch exporter to it for those who want every
graph compared with the torch network at import time (`tsrt models import --verify-with-torch`), for
benchmarks that time that path, and for the tests that compare both paths' stores.
"""

from __future__ import annotations

from functools import partial

from tsrt.models.totalseg_import import (  # noqa: F401 (the runtime's names, re-exported)
    ImportOutcome,
    export_into_store as _export_into_store,
    import_models as _import_models,
    import_task as _import_task,
    locate,
    results_root,
)
from tsrt_export.onnx_export import export_model

import_models = partial(_import_models, exporter=export_model)
import_task = partial(_import_task, exporter=export_model)
export_into_store = partial(_export_into_store, exporter=export_model)
