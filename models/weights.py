"""Reading weights: safetensors for serving, ``torch.load(weights_only=True)`` only for conversion.

Serving builds the module on the ``meta`` device and assigns memory-mapped tensors from the
safetensors file, so N worker processes on one host share one page-cache copy of the weights
instead of N private copies (``load_state_dict`` into real parameters copies them).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: one file, or the shards its index names."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    hint = f"; found {pickles}: convert them with bin/modelsrv-convert" if pickles else ""
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, memory-mapped (CPU)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a module without allocating its parameters, and without initialising them.

    The weights are assigned from safetensors right after, so the modules' random
    initialisation is wasted work; worse, the first ``normal_`` on a meta tensor imports
    ``torch._dynamo``, which cost 3-7 s of every worker's start (measured with MaskFormer).
    """
    with _no_init(), torch.device("meta"):
        return factory()


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops (modules look them up at call time)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, _keep)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_into(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    device: torch.device,
    optional: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Assign ``state`` to a module built on ``meta``; every parameter and buffer must be covered.

    Keys ending with a suffix in ``optional`` (e.g. ``num_batches_tracked``) may be absent: they
    are materialised as zeros. Unknown keys are an error: a checkpoint for another architecture
    must not load silently.
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    full = dict(state)
    for k, v in expected.items():
        if k not in full:
            full[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif tuple(full[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k}: shape {tuple(full[k].shape)} != expected {tuple(v.shape)}")
    module.load_state_dict(full, assign=True, strict=True)
    # Non-persistent buffers are not in the state dict: they stay on meta unless we rebuild them.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise ValueError(f"buffer {name} is not persistent and was not initialised; build it in the module")
    return module.to(device).eval()


def torch_load_tensors(path: Path) -> dict:
    """Load a pickled checkpoint with ``weights_only=True``; refuse one that holds anything but tensors and plain data."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for arbitrary objects, with torch's explanation
        raise ValueError(
            f"{path}: refused: not a plain tensor checkpoint (torch.load(weights_only=True) failed: "
            f"{str(exc).splitlines()[0]})"
        ) from None


def write_model_folder(out: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (contiguous, no shared storage)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def plain_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict of a loaded checkpoint: a bare state dict, or one under 'state_dict'/'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError("checkpoint is not a state dict (a dict of parameter name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint holds non-tensor entries: {bad[:5]}")
    return obj


def check_state(factory: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor], what: str) -> None:
    """ValueError unless ``state`` has exactly the names and shapes of the module ``factory`` builds.

    ``num_batches_tracked`` may be absent (torchvision's published files have none). Used by the
    converters, so a checkpoint that does not fit its config is refused before anything is written.
    """
    expected = build_on_meta(factory).state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint does not match {what}: missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}"
        )
