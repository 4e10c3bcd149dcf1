"""``bin/modelsrv-convert TYPE SRC OUT``: turn a pickled release checkpoint into a model folder.

The only place where pickles are read, always with ``torch.load(weights_only=True)``; the server
itself reads safetensors only. Each model class that has a release format implements
``Model.convert``; the model types come from the one registry, ``models.catalog``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.catalog import known_model_types, model_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelsrv-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="model_type", required=True)
    for name in known_model_types():
        cls = model_class(name)
        if not cls.has_converter():
            continue
        p = sub.add_parser(name, help=f"convert a {name} checkpoint")
        p.add_argument("src", type=Path, help="the pickled checkpoint")
        p.add_argument("out", type=Path, help="the model folder to write")
        cls.add_convert_arguments(p)
    args = parser.parse_args(argv)
    try:
        out = model_class(args.model_type).convert(args.src, args.out, args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"modelsrv-convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
