"""int8 graphs made from the user's own scans, installed only when they segment like fp32 (`tsrt models quantize`).

    calibration.py  the scans -> the model's own network inputs (tsrt's reading, preprocessing and tiles)
    graph.py        ONNX Runtime static quantization into one QDQ graph (ORT CPU and OpenVINO read it)
    gate.py         fp32 vs int8 on held-out scans: per-class Dice, voxel agreement, seconds; the thresholds
    install.py      the whole job: write candidates to temp files, gate them, rename into place only on a pass

Layer 6: it runs the pipeline and the TotalSegmentator task geometry (layers 3 and 5) and sits beside the
companions; the CLI (`tsrt/cli/models.py`) imports it inside its command.
"""
