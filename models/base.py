"""The one interface every model implements, so the server can serve any of them the same way.

A model is built from a model folder (``config.json`` + safetensors), declares its inputs and
outputs, turns one request's decoded tensors into model tensors (``prepare``), and runs a batched
forward (``forward``). The server owns everything else: wire formats, batching, threads.

Why ``prepare`` is per request and ``forward`` per batch: validation and decoding (JPEG, say)
belong to the request that brought the data, so a bad request fails alone; the forward runs on
the concatenation of many requests' prepared tensors along dim 0.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from models.spec import KSERVE_TO_NUMPY, NUMPY_TO_KSERVE, InputError, RequestTensor, TensorSpec

__all__ = ["KSERVE_TO_NUMPY", "NUMPY_TO_KSERVE", "InputError", "Model", "RequestTensor", "TensorSpec", "load_model"]


class Model(abc.ABC):
    """Base class of every servable model; ``models.catalog`` names each subclass by its ``model_type``.

    Subclasses set ``model_type``, ``inputs`` and ``outputs`` (as class or instance attributes)
    and implement ``build``, ``prepare`` and ``forward``; those with a release checkpoint format
    implement ``convert`` (and ``add_convert_arguments``) for ``bin/modelsrv-convert``.

    Configuration, the same in every model module: a frozen dataclass (``DenseNetConfig``,
    ``AFNOConfig``, ``MaskFormerConfig``, ``Detr3DConfig``, ``BloomConfig``) whose
    ``from_dict(config)`` validates a config.json dict, raising ``ValueError`` with a message that
    names the model type and the key, and whose ``to_json()`` gives the config.json of a folder
    written from it. An instance keeps the folder's dict as read in ``config`` and the validated
    dataclass in ``cfg``.
    """

    model_type: ClassVar[str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device) -> None:
        self.folder = folder
        self.config = config
        self.device = device

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> Model:
        """Build the model from ``folder`` (weights from safetensors only) on ``device``."""

    # -- conversion of pickled release checkpoints (bin/modelsrv-convert) ----------------------------
    @classmethod
    def convert(cls, src: Path, out: Path, args: Any) -> Path:
        """Turn the pickled checkpoint ``src`` into the model folder ``out`` (``torch.load(weights_only=True)``)."""
        raise NotImplementedError(f"model_type {cls.model_type!r} has no converter")

    @classmethod
    def add_convert_arguments(cls, parser: Any) -> None:
        """Options of this model type's converter (an argparse parser); none by default."""
        return None

    @classmethod
    def has_converter(cls) -> bool:
        return cls.convert.__func__ is not Model.convert.__func__

    # -- per request ----------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Validate one request and return CPU tensors whose dim 0 is the request's batch size.

        Raises ``InputError`` for anything the client got wrong. Runs off the event loop. Items
        (rows of dim 0) must be prepared independently of each other: the server may call this
        once for several requests whose inputs agree but for dim 0, concatenated, and split the
        results by row (it falls back to one call per request when such a call fails).
        """

    def batch_key(self, prepared: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> Any:
        """Requests with equal keys may be concatenated into one batch (default: equal shapes but dim 0)."""
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(prepared.items()))

    # -- per batch ------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run one batch (tensors concatenated along dim 0, still on the CPU); return CPU outputs, dim 0 = batch."""

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        """A valid request of ``batch_size`` items, used for warm-up (and by tests and benchmarks)."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one small batch so the first real request does not pay for lazy initialisation."""
        prepared = self.prepare(self.example_inputs(1), {})
        with torch.inference_mode():
            self.forward(prepared, {})

    # -- helpers for subclasses -----------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, RequestTensor]) -> None:
        """Check names, datatypes and ranks/fixed dims against ``self.inputs`` (raises InputError)."""
        known = {spec.name for spec in self.inputs}
        for name in inputs:
            if name not in known:
                raise InputError(f"unexpected input {name!r}; this model takes {sorted(known)}")
        for spec in self.inputs:
            if spec.name not in inputs:
                if spec.optional:
                    continue
                raise InputError(f"missing input {spec.name!r}")
            value = inputs[spec.name]
            if spec.datatype == "BYTES":
                if not isinstance(value, list):
                    raise InputError(f"input {spec.name!r} must be BYTES")
                shape: tuple[int, ...] = (len(value),)
            else:
                if not isinstance(value, np.ndarray):
                    raise InputError(f"input {spec.name!r} must be {spec.datatype}")
                got = NUMPY_TO_KSERVE.get(value.dtype)
                if got != spec.datatype:
                    raise InputError(f"input {spec.name!r} must be {spec.datatype}, got {got or value.dtype}")
                shape = value.shape
            if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, shape)):
                raise InputError(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(shape)}")
            if shape[0] < 1:
                raise InputError(f"input {spec.name!r} has an empty batch")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (a model folder holds config.json and model.safetensors)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path}: no model_type")
    return config


def load_model(folder: str | Path, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None) -> Model:
    """Build the model that ``folder/config.json`` names, with its weights, on ``device``, in eval mode.

    ``options`` (the server's model-block settings a model reads, e.g. ``max_image_pixels``) are
    laid over config.json; a model ignores options it does not know.
    """
    folder = Path(folder)
    config = {**read_config(folder), **(options or {})}
    from models.catalog import model_class

    cls = model_class(config["model_type"])
    return cls.build(folder, config, torch.device(device))
