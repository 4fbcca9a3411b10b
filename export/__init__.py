"""tsrt's export toolchain (installed as `tsrt_export`; needs the `export` extra: torch, nnunetv2, onnx).

Turns trained nnU-Net v2 folds into ONNX graphs with recorded plans, and imports TotalSegmentator
weights into the tsrt model store. The runtime (`tsrt`) never imports this package eagerly.
"""
