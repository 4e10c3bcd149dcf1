"""KServe v2 / Open Inference Protocol bodies, with Triton's binary-tensor extension.

A request body is JSON, optionally followed by raw tensor bytes: ``Inference-Header-Content-Length``
says where the JSON ends, and each input with ``parameters.binary_data_size`` takes that many
bytes of the tail, in order. BYTES tensors in binary form are 4-byte little-endian lengths each
followed by the bytes. Replies use the same scheme when the client asks for binary outputs
(``binary_data`` per output or ``binary_data_output`` for all), which is what tritonclient does.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.spec import KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, InputError

PROTOCOL_PARAMETERS = {"binary_data_output", "binary_data", "binary_data_size", "classification", "shared_memory_region",
                       "shared_memory_byte_size", "shared_memory_offset", "sequence_id", "sequence_start", "sequence_end",
                       "priority", "timeout", "headers"}


MAX_DIM = (1 << 31) - 1  # a larger dimension is no tensor anyone can send; numpy refuses some far below 2**63


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray | list[bytes]]
    parameters: dict[str, Any]
    outputs: list[str] | None  # None = every output
    binary: dict[str, bool] = field(default_factory=dict)  # per output: answer in binary?
    binary_default: bool = False


def _bytes_elements(buf: memoryview, count: int, name: str) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(buf):
            raise InputError(f"input {name!r}: BYTES data truncated")
        (n,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + n > len(buf):
            raise InputError(f"input {name!r}: BYTES data truncated")
        items.append(bytes(buf[offset : offset + n]))
        offset += n
    if offset != len(buf):
        raise InputError(f"input {name!r}: {len(buf) - offset} extra bytes after {count} BYTES elements")
    return items


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    if header_length is None:
        json_part, tail = body, memoryview(b"")
    else:
        if not 0 <= header_length <= len(body):
            raise InputError(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
        json_part, tail = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InputError("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InputError("the request must be a JSON object with an 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object")
    inputs: dict[str, np.ndarray | list[bytes]] = {}
    offset = 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError("each input needs a 'name'")
        name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
        if name in inputs:
            raise InputError(f"input {name!r} given twice")
        if not isinstance(datatype, str):
            raise InputError(f"input {name!r}: 'datatype' must be a string")
        if not isinstance(shape, list) or not all(type(s) is int and 0 <= s <= MAX_DIM for s in shape):  # bool is not a size
            raise InputError(f"input {name!r}: 'shape' must be a list of integers in [0, {MAX_DIM}]")
        count = math.prod(shape)  # exact (np.prod wraps around in int64)
        if datatype != "BYTES" and datatype not in KSERVE_TO_NUMPY:
            raise InputError(f"input {name!r}: unknown datatype {datatype!r}")
        iparams = item.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InputError(f"input {name!r}: binary_data_size {size} exceeds the {len(tail) - offset} bytes left in the body")
            raw = tail[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                inputs[name] = _bytes_elements(raw, count, name)
            else:
                dtype = KSERVE_TO_NUMPY[datatype]
                if size != count * dtype.itemsize:
                    raise InputError(f"input {name!r}: {size} bytes, shape {shape} {datatype} needs {count * dtype.itemsize}")
                inputs[name] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
        else:
            inputs[name] = _json_tensor(name, datatype, shape, count, item.get("data"))
    if offset != len(tail):
        raise InputError(f"{len(tail) - offset} bytes of binary data not claimed by any input")
    binary_default = bool(params.get("binary_data_output", False))
    outputs, binary = None, {}
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InputError("'outputs' must be a list")
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InputError("each requested output needs a 'name'")
            outputs.append(o["name"])
            oparams = o.get("parameters") or {}
            if isinstance(oparams, dict) and "binary_data" in oparams:
                binary[o["name"]] = bool(oparams["binary_data"])
    model_params = {k: v for k, v in params.items() if k not in PROTOCOL_PARAMETERS}
    request_id = doc.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs, model_params, outputs, binary, binary_default)


def _json_tensor(name: str, datatype: str, shape: list[int], count: int, data: Any) -> np.ndarray | list[bytes]:
    if data is None:
        raise InputError(f"input {name!r}: no 'data' and no binary_data_size")
    if datatype == "BYTES":
        flat = data if isinstance(data, list) else [data]
        flat = list(_flatten(flat))
        if len(flat) != count or not all(isinstance(x, str) for x in flat):
            raise InputError(f"input {name!r}: BYTES data must be {count} strings")
        return [x.encode("utf-8") for x in flat]
    dtype = KSERVE_TO_NUMPY[datatype]
    try:
        arr = np.asarray(data)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise ValueError("not numbers")
        arr = arr.astype(dtype, casting="unsafe" if arr.dtype.kind in "biuf" else "no")
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r}: data is not {datatype} numbers: {exc}") from None
    if arr.size != count:
        raise InputError(f"input {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def _flatten(items: list) -> Any:
    for x in items:
        if isinstance(x, list):
            yield from _flatten(x)
        else:
            yield x


def _json_numbers(arr: np.ndarray) -> list:
    """Values for a JSON ``data`` list. JSON has no NaN or infinity: those travel as the strings
    "NaN", "Infinity", "-Infinity", which numpy (and so tritonclient's ``as_numpy``) reads back."""
    data = arr.ravel().tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        data = [x if math.isfinite(x) else ("NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")) for x in data]
    return data


def build_response(model: str, version: str, request: InferRequest, outputs: dict[str, Any]) -> tuple[bytes, int | None]:
    """The reply body and, for a binary reply, its JSON header length."""
    names = request.outputs if request.outputs is not None else list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise InputError(f"unknown output {unknown[0]!r}; this model returns {sorted(outputs)}")
    descs, chunks = [], []
    for name in names:
        value = outputs[name]
        binary = request.binary.get(name, request.binary_default)
        if isinstance(value, list) or (isinstance(value, np.ndarray) and value.dtype == object):
            items = [bytes(b) for b in (value if isinstance(value, list) else value.ravel())]
            shape, datatype = [len(items)] if isinstance(value, list) else list(value.shape), "BYTES"
            if binary:
                raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
            else:
                data = [b.decode("utf-8", "replace") for b in items]
        else:
            arr = np.ascontiguousarray(value)
            datatype, shape = NUMPY_TO_KSERVE[arr.dtype], list(arr.shape)
            if binary:
                raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            else:
                data = _json_numbers(arr)
        desc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            desc["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            desc["data"] = data
        descs.append(desc)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": descs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
