"""The bare ZeroMQ baseline: one process, one ROUTER socket, a synchronous echo loop.

Each request's header is read (for its id) and answered with an ``ok`` header whose outputs are
the request's own tensors and frames, so the project's clients take it for a model reply. This is
the ceiling for any Python server speaking modelsrv's wire format over pyzmq in one process.

    python bench/echo.py tcp://127.0.0.1:PORT [--max-seconds 1800]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import msgpack
import zmq


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(args.address)
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


if __name__ == "__main__":
    sys.exit(main())
