"""Write the benchmark's model folders and one example request per model (``.npz``).

    python bench/prepare.py OUTDIR   ->  prints {"name": {"folder", "npz", "shapes"}, ...} as JSON

Deterministic random weights (as ``models.demo``): nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# DenseNet-121: torchvision's architecture (the default config), 1x3x224x224 requests.
DENSENET121: dict = {}
# The per-request-overhead model: the smallest DenseNet, on a dedicated tiny input.
TINY = {"growth_rate": 2, "block_config": [1], "num_init_features": 2, "num_classes": 2}
TINY_SHAPE = (1, 3, 8, 8)
# A moderate AFNO (FourCastNet's layout, scaled down): about 5 ms per 1x4x64x128 field on one core.
AFNO = {"img_size": [64, 128], "patch_size": [8, 8], "in_chans": 4, "out_chans": 4, "embed_dim": 128, "depth": 4,
        "mlp_ratio": 4.0, "num_blocks": 8, "sparsity_threshold": 0.01, "hard_thresholding_fraction": 1.0}


def write(out: Path, names: list[str] | None = None) -> dict:
    from models.afno import random_afno_folder
    from models.base import load_model
    from models.densenet import random_densenet_folder
    from models.detr3d import random_detr3d_folder
    from models.maskformer import random_maskformer_folder

    makers = {
        "densenet121": lambda p: random_densenet_folder(p, DENSENET121, seed=0),
        "tiny": lambda p: random_densenet_folder(p, TINY, seed=0),
        "afno": lambda p: random_afno_folder(p, AFNO, seed=0),
        "maskformer": lambda p: random_maskformer_folder(p, seed=0),  # tiny_config(): Swin, 64x64 requests
        "detr3d": lambda p: random_detr3d_folder(p, None, seed=0),  # tiny default: 2 cameras, 64x96
    }
    info = {}
    for name, make in makers.items():
        if names and name not in names:
            continue
        folder = out / name
        if not (folder / "config.json").is_file():
            make(folder)
        npz = out / f"{name}.npz"
        if not npz.is_file():
            if name == "tiny":
                example = {"images": np.random.default_rng(0).standard_normal(TINY_SHAPE, dtype=np.float32)}
            else:
                example = load_model(folder, "cpu").example_inputs(1)
            np.savez(npz, **example)
        with np.load(npz) as z:
            shapes = {k: list(z[k].shape) for k in z.files}
        info[name] = {"folder": str(folder), "npz": str(npz), "shapes": shapes}
    return info


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(write(out, sys.argv[2:] or None)))
