"""tsrt: TotalSegmentator and nnU-Net v2 inference on ONNX Runtime, without torch.

    import tsrt
    seg = tsrt.segment("ct.nii.gz", "segmentations", task="total", fast=True)  # like TotalSegmentator's python API

`segment` is imported on first use, so `import tsrt` stays light (no onnxruntime, numba, nibabel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "contrast_phase", "modality", "segment"]

#: Lazily imported public functions: name -> module.
_LAZY = {"segment": "tsrt.totalseg", "contrast_phase": "tsrt.phase", "modality": "tsrt.modality"}

if TYPE_CHECKING:
    from tsrt.modality import modality
    from tsrt.phase import contrast_phase
    from tsrt.totalseg import segment


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tsrt' has no attribute {name!r}")
