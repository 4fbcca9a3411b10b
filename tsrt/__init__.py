"""tsrt: TotalSegmentator and nnU-Net v2 inference on ONNX Runtime, without torch.

    import tsrt
    seg = tsrt.segment("ct.nii.gz", "segmentations", task="total", fast=True)  # like TotalSegmentator's python API

`segment` is imported on first use, so `import tsrt` stays light (no onnxruntime, numba, nibabel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tsrt.version import __version__

__all__ = [
    "__version__", "aorta_report", "body_report", "contrast_phase", "image_modality", "measure_evans_index",
    "pulmonary_report", "segment", "spine_report",
]

#: Lazily imported public functions: name -> module.
#: (Named for what they return, not like their modules, so no module attribute is shadowed.)
_LAZY = {
    "segment": "tsrt.totalseg.task",
    "contrast_phase": "tsrt.companions.phase",
    "image_modality": "tsrt.companions.modality",
    "measure_evans_index": "tsrt.companions.evans_index",
    "spine_report": "tsrt.reports.spine",
    "aorta_report": "tsrt.reports.aorta",
    "pulmonary_report": "tsrt.reports.pulmonary",
    "body_report": "tsrt.reports.body",
}

if TYPE_CHECKING:
    from tsrt.companions.evans_index import measure_evans_index
    from tsrt.companions.modality import image_modality
    from tsrt.companions.phase import contrast_phase
    from tsrt.reports.spine import spine_report
    from tsrt.reports.aorta import aorta_report
    from tsrt.reports.pulmonary import pulmonary_report
    from tsrt.reports.body import body_report
    from tsrt.totalseg.task import segment


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        from tsrt.cli.progress import install_terminal_progress

        install_terminal_progress()  # the Python API shows the CLI's bars unless the caller installed its own
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tsrt' has no attribute {name!r}")
