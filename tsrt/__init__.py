"""tsrt: TotalSegmentator and nnU-Net v2 inference on ONNX Runtime, without torch.

    import tsrt
    seg = tsrt.segment("ct.nii.gz", "segmentations", task="total", fast=True)  # like TotalSegmentator's python API

`segment` is imported on first use, so `import tsrt` stays light (no onnxruntime, numba, nibabel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "contrast_phase", "image_modality", "measure_evans_index", "segment"]

#: Lazily imported public functions: name -> module.
#: (Not named like their modules: importing tsrt.modality would shadow a function `tsrt.modality`.)
_LAZY = {
    "segment": "tsrt.totalseg",
    "contrast_phase": "tsrt.phase",
    "image_modality": "tsrt.modality",
    "measure_evans_index": "tsrt.evans_index",
}

if TYPE_CHECKING:
    from tsrt.evans_index import measure_evans_index
    from tsrt.modality import image_modality
    from tsrt.phase import contrast_phase
    from tsrt.totalseg import segment


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tsrt' has no attribute {name!r}")
