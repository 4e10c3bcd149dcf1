"""What the master may know about models without importing torch: the model types and folder layout."""

from __future__ import annotations

import json
from pathlib import Path

# model_type -> module under models/ implementing it.
MODEL_TYPES: dict[str, str] = {
    "densenet": "models.densenet",
    "afno": "models.afno",
    "maskformer": "models.maskformer",
    "detr3d": "models.detr3d",
}


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
