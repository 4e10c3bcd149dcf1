"""``python -m models.demo DIR``: write the demo model folders that conf/srv.conf serves.

One folder per model type, with deterministic random weights (nothing is downloaded): a
DenseNet-121 in torchvision's layout, a small AFNO, a tiny MaskFormer-Swin (transformers'
layout), a tiny DETR3D (two cameras, 64x96 images) and a tiny BLOOM with the tokenizer built
locally by ``models.bloom``. All but DenseNet-121 load in well under a second on a CPU. Their
outputs are noise: they show the interfaces, not the accuracy. Real checkpoints go through
``bin/modelsrv-convert`` instead. Existing folders are left alone, so ``make run`` is fast after
the first time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

DEMO_AFNO = {"img_size": [32, 64], "patch_size": [8, 8], "in_chans": 4, "out_chans": 4, "embed_dim": 64, "depth": 2,
             "mlp_ratio": 4.0, "num_blocks": 4, "sparsity_threshold": 0.01, "hard_thresholding_fraction": 1.0}


def _densenet(out: Path) -> Path:
    from models.densenet import random_densenet_folder

    return random_densenet_folder(out, None, seed=0)


def _afno(out: Path) -> Path:
    from models.afno import random_afno_folder

    return random_afno_folder(out, DEMO_AFNO, seed=0)


def _maskformer(out: Path) -> Path:
    from models.maskformer import random_maskformer_folder

    return random_maskformer_folder(out, seed=0)  # tiny_config(): Swin backbone, 10 queries, 5 labels


def _detr3d(out: Path) -> Path:
    from models.detr3d import random_detr3d_folder

    return random_detr3d_folder(out, None, seed=0)  # 2 cameras of 64x96, 16 queries, K = 20 boxes


def _bloom(out: Path) -> Path:
    from models.bloom import random_bloom_folder

    return random_bloom_folder(out, None, seed=0)  # 2 layers, hidden 64, the locally trained tokenizer


# folder name (as conf/srv.conf names it) -> writer
FOLDERS: dict[str, Callable[[Path], Path]] = {
    "densenet121": _densenet,
    "afno_demo": _afno,
    "maskformer_demo": _maskformer,
    "detr3d_demo": _detr3d,
    "bloom_demo": _bloom,
}


def main(argv: list[str]) -> int:
    store = Path(argv[0] if argv else "models/store")
    for name, make in FOLDERS.items():
        out = store / name
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            continue
        make(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
