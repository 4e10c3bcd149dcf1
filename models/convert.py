"""``bin/modelsrv-convert TYPE SRC OUT``: turn a pickled release checkpoint into a model folder.

The only place where pickles are read, always with ``torch.load(weights_only=True)``; the server
itself reads safetensors only. Each model file registers its converter with ``@converter``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from models.base import _import_builtin_models

# model_type -> (convert(src, out, args) -> out, extra CLI options adder or None)
Converter = Callable[[Path, Path, argparse.Namespace], Path]
_CONVERTERS: dict[str, tuple[Converter, Callable[[argparse.ArgumentParser], None] | None]] = {}


def converter(model_type: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: register ``fn(src, out, args) -> out`` as the converter for ``model_type``."""

    def wrap(fn: Converter) -> Converter:
        _CONVERTERS[model_type] = (fn, add_arguments)
        return fn

    return wrap


def main(argv: list[str] | None = None) -> int:
    _import_builtin_models()
    parser = argparse.ArgumentParser(prog="modelsrv-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="model_type", required=True)
    for name, (_, add_arguments) in sorted(_CONVERTERS.items()):
        p = sub.add_parser(name, help=f"convert a {name} checkpoint")
        p.add_argument("src", type=Path, help="the pickled checkpoint")
        p.add_argument("out", type=Path, help="the model folder to write")
        if add_arguments:
            add_arguments(p)
    args = parser.parse_args(argv)
    fn, _ = _CONVERTERS[args.model_type]
    try:
        out = fn(args.src, args.out, args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"modelsrv-convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    # run as ``python -m models.convert``: this module is __main__, but the model files register
    # their converters in ``models.convert``; use that one
    from models.convert import main as registered_main

    sys.exit(registered_main())
