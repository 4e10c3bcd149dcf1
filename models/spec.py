"""Tensor names, datatypes and the client's-fault exception: what both sides of the wire share.

Kept free of torch so that clients and the wire format (``server.wire``, ``server.client``)
import in milliseconds; ``models.base`` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class InputError(ValueError):
    """The request is wrong (name, dtype, shape, parameter): the client gets a 4xx, nobody else is affected."""


# KServe v2 datatype names <-> numpy dtypes. BYTES travels as a list of ``bytes``.
KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_KSERVE: dict[np.dtype, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape`` includes the batch dimension as -1; -1 elsewhere = any size."""

    name: str
    datatype: str  # KServe name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# What a request brings after decoding: numpy arrays, or a list of bytes for BYTES tensors.
RequestTensor = np.ndarray | list[bytes]
