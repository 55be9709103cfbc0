"""Triton client inputs as the docs build them."""

from __future__ import annotations

import numpy as np


def triton_inputs(module, tensors: dict) -> list:
    """``tritonclient.http`` or ``.grpc`` (``module``) inputs of shape [1]: bytes and str as BYTES, numpy
    scalars as their datatype."""
    inputs = []
    for name, value in tensors.items():
        if isinstance(value, (bytes, str)):
            array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
            tensor = module.InferInput(name, [1], "BYTES")
        else:
            array = np.array([value])
            tensor = module.InferInput(name, [1], {np.int32: "INT32", np.int64: "INT64", np.float32: "FP32"}[type(value)])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
