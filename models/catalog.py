"""The one registry of model types, readable without torch.

``MODEL_TYPES`` maps a folder's ``model_type`` to the class that serves it. The master checks
configs against it and must never import torch, so the classes are named, not imported, here;
a worker imports the one it serves (``model_class``). A converter for pickled release
checkpoints is part of the class (``Model.convert``), so adding a model type is one line here
and one file under ``models/``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# model_type -> "module:Class" implementing it
MODEL_TYPES: dict[str, str] = {
    "afno": "models.afno:AFNOModel",
    "bloom": "models.bloom:Bloom",
    "densenet": "models.densenet:DenseNetModel",
    "detr3d": "models.detr3d:Detr3DModel",
    "maskformer": "models.maskformer:MaskFormer",
}


def model_class(model_type: str) -> Any:
    """The ``models.base.Model`` subclass serving ``model_type`` (imports it, and so torch)."""
    try:
        module, _, name = MODEL_TYPES[model_type].partition(":")
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r} (known: {', '.join(sorted(MODEL_TYPES))})") from None
    return getattr(importlib.import_module(module), name)


# model types that can be sharded with ``tensor_parallel k`` (models.parallel)
TENSOR_PARALLEL_TYPES = ("bloom",)


def tensor_parallel_sizes(folder: Path) -> tuple[int, int]:
    """(attention heads, vocabulary rows) of a model folder that supports tensor parallelism (no torch)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in TENSOR_PARALLEL_TYPES:
        raise ValueError(f"model_type {model_type!r} does not support tensor_parallel (only {', '.join(TENSOR_PARALLEL_TYPES)})")
    heads = config.get("n_head", config.get("num_attention_heads"))
    vocab = config.get("vocab_size")
    if not isinstance(heads, int) or not isinstance(vocab, int) or heads < 1 or vocab < 1:
        raise ValueError(f"{folder}/config.json: n_head and vocab_size must be positive integers")
    return heads, vocab


def known_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def check_model_folder(folder: Path) -> str:
    """Return the folder's model_type, or raise ValueError saying what is wrong (no torch needed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    cfg = folder / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except FileNotFoundError:
        raise ValueError(f"{cfg} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg} is not valid JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{cfg}: unknown model_type {model_type!r} (known: {', '.join(sorted(MODEL_TYPES))})")
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise ValueError(f"{folder} holds no model.safetensors (pickled checkpoints must be converted first)")
    return model_type
