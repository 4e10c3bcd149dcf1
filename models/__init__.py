"""Pure-torch models servable by modelsrv. Nothing here imports ``server``.

Attributes are imported lazily (PEP 562) so that ``models.catalog`` stays importable without
torch: the master process reads it to check configs and must never import torch.
"""

from typing import Any

__all__ = ["InputError", "Model", "TensorSpec", "known_model_types", "load_model", "model_class"]


def __getattr__(name: str) -> Any:
    if name in ("known_model_types", "model_class"):
        from models import catalog

        return getattr(catalog, name)
    if name in __all__:
        from models import base

        return getattr(base, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
