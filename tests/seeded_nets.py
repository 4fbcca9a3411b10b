"""Small nnU-Net networks built torch-free (tsrt.models.onnx_graph) for tests that need a graph of a known shape."""

from __future__ import annotations

from typing import Any


def plain_unet_plans(patch: list[int], *, instance_norm: bool, features: tuple[int, ...] = (4, 8, 16)) -> dict[str, Any]:
    """plans.json of a 3-D PlainConvUNet (3x3x3 kernels, stride 2 below the top, two convs per stage, LeakyReLU)."""
    n = len(features)
    norm = ("torch.nn.modules.instancenorm.InstanceNorm3d", {"eps": 1e-5, "affine": True}) if instance_norm else (None, None)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": norm[0], "norm_op_kwargs": norm[1], "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return {"configurations": {"3d_fullres": {"architecture": arch, "patch_size": list(patch)}}}
