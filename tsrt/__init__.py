"""tsrt: TotalSegmentator and nnU-Net v2 inference on ONNX Runtime, without torch.

    import tsrt
    seg = tsrt.segment("ct.nii.gz", "segmentations", task="total", fast=True)  # like TotalSegmentator's python API

`segment` is imported on first use, so `import tsrt` stays light (no onnxruntime, numba, nibabel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "segment"]

if TYPE_CHECKING:
    from tsrt.totalseg import segment


def __getattr__(name: str) -> Any:
    if name == "segment":
        from tsrt.totalseg import segment

        return segment
    raise AttributeError(f"module 'tsrt' has no attribute {name!r}")
