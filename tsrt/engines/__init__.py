"""Execution engines: ONNX Runtime providers, OpenVINO and ahead-of-time TensorRT engines."""
