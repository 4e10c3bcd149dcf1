"""``python -m models.demo DIR``: write the demo model folders that conf/srv.conf serves.

Deterministic random weights (nothing is downloaded): a DenseNet-121 with torchvision's layout
and a small AFNO. Real checkpoints go through bin/modelsrv-convert instead. Existing folders are
left alone, so ``make run`` is fast after the first time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from models.afno import random_afno_folder
from models.densenet import random_densenet_folder

DEMO_AFNO = {"img_size": [32, 64], "patch_size": [8, 8], "in_chans": 4, "out_chans": 4, "embed_dim": 64, "depth": 2,
             "mlp_ratio": 4.0, "num_blocks": 4, "sparsity_threshold": 0.01, "hard_thresholding_fraction": 1.0}


def main(argv: list[str]) -> int:
    store = Path(argv[0] if argv else "models/store")
    folders = {
        "densenet121": lambda out: random_densenet_folder(out, None, seed=0),
        "afno_demo": lambda out: random_afno_folder(out, DEMO_AFNO, seed=0),
    }
    for name, make in folders.items():
        out = store / name
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            continue
        make(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
