"""The bare ZeroMQ baseline: one process, one ROUTER socket, a synchronous echo loop.

Each request's header is read (for its id) and answered with an ``ok`` header whose outputs are
the request's own tensors and frames, so the project's clients take it for a model reply. This is
the ceiling for any Python server speaking modelsrv's wire format over pyzmq in one process.

With ``--model FOLDER`` it is the *model loop* instead: every request waiting (up to 32) is decoded,
the batch goes through the model's own ``prepare`` and ``forward`` (one torch thread), and each
request gets its slice of the outputs. What one process could do with the model and nothing of a
server (no batching window, queue bound, timeouts, metrics, logs, second door): the limit the
tiny model's serving path is measured against besides the echo loop, which runs no model.

    python bench/echo.py tcp://127.0.0.1:PORT [--model FOLDER] [--max-seconds 1800]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import msgpack
import zmq


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--model", help="a model folder: run it on each batch of waiting requests")
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(args.address)
    if args.model:
        return model_loop(router, args.model, time.monotonic() + args.max_seconds)
    print("ready", flush=True)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        if not router.poll(1000):
            continue
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            header = msgpack.unpackb(frames[1].bytes, raw=False)
            reply = msgpack.packb({"v": 1, "id": header.get("id"), "ok": True, "outputs": header.get("inputs", [])},
                                  use_bin_type=True)
            router.send_multipart([frames[0], reply, *frames[2:]], copy=False)
    return 0


def model_loop(router: zmq.Socket, folder: str, deadline: float, max_batch: int = 32) -> int:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.base import load_model
    from server import wire

    torch.set_num_threads(1)
    model = load_model(folder)
    print("ready", flush=True)
    while time.monotonic() < deadline:
        if not router.poll(1000):
            continue
        waiting = []  # (identity, request id, inputs)
        while len(waiting) < max_batch:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            header = msgpack.unpackb(frames[1].bytes, raw=False)
            waiting.append((frames[0], header.get("id"), wire.decode_tensors(header["inputs"], frames[2:])))
        if not waiting:
            continue
        names = waiting[0][2].keys()
        joined = {k: np.concatenate([inputs[k] for _, _, inputs in waiting]) for k in names}
        with torch.inference_mode():
            outputs = {k: v.numpy() for k, v in model.forward(model.prepare(joined, {}), {}).items()}
        start = 0
        for identity, request_id, inputs in waiting:
            end = start + len(next(iter(inputs.values())))
            router.send_multipart([identity, *wire.reply_ok(request_id, {k: v[start:end] for k, v in outputs.items()})],
                                  copy=False)
            start = end
    return 0


if __name__ == "__main__":
    sys.exit(main())
