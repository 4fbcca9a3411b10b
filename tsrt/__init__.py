"""tsrt: TotalSegmentator and nnU-Net v2 inference on ONNX Runtime, without torch."""

__version__ = "0.1.0"
