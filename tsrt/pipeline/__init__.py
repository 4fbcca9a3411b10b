"""The nnU-Net runtime, one module per stage: read, preprocess, infer (sliding window), postprocess, write."""
