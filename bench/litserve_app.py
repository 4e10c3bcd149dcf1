"""The peer: the same model served by LitServe, as a user would write it (runs in .venv-bench).

    PYTHONPATH=. .venv-bench/bin/python bench/litserve_app.py --folder F --port P [--workers 2]

Same work per request as a modelsrv worker: ``decode_request`` decodes the tensors and runs the
model's ``prepare``; ``batch`` concatenates, ``predict`` runs the model's ``forward`` (one torch
thread per inference worker, worker i pinned to core i, as modelsrv's workers), ``unbatch``
splits, ``encode_response`` returns base64 tensors in JSON. Requests are JSON with base64 tensor
data: LitServe parses every request body as JSON (or a form), so a raw binary body is not an option.
"""

from __future__ import annotations

import argparse
import base64
import os

import litserve as ls
import numpy as np


class ModelAPI(ls.LitAPI):
    def __init__(self, folder: str, threads: int, pin: bool, **kw) -> None:
        super().__init__(**kw)
        self.folder, self.threads, self.pin = folder, threads, pin

    def setup(self, device) -> None:
        if self.pin:
            cores = sorted(os.sched_getaffinity(0))
            worker = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
            os.sched_setaffinity(0, [cores[worker % len(cores)]])
        import torch

        torch.set_num_threads(self.threads)
        from models.base import load_model

        self.model = load_model(self.folder, "cpu")
        self.model.warmup()

    def decode_request(self, request):
        inputs = {name: np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"])).reshape(t["shape"])
                  for name, t in request["inputs"].items()}
        return self.model.prepare(inputs, {})

    def batch(self, inputs):
        import torch

        sizes = [next(iter(p.values())).shape[0] for p in inputs]
        joined = {k: torch.cat([p[k] for p in inputs]) for k in inputs[0]}
        return joined, sizes

    def predict(self, x):
        batch, sizes = x if isinstance(x, tuple) else (x, None)
        return self.model.forward(batch, {}), sizes

    def unbatch(self, output):
        outputs, sizes = output
        parts, offset = [], 0
        for n in sizes:
            parts.append({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n
        return parts

    def encode_response(self, output):
        if isinstance(output, tuple):  # max_batch_size 1: predict's (outputs, None)
            output = output[0]
        return {name: {"shape": list(t.shape), "dtype": str(t.numpy().dtype),
                       "data": base64.b64encode(t.numpy().tobytes()).decode()} for name, t in output.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout", type=float, default=0.002)
    ap.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queue between its processes")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    args = ap.parse_args()
    api = ModelAPI(args.folder, args.threads, args.pin, max_batch_size=args.max_batch_size,
                   batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=120,
                          fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
