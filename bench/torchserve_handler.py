"""The TorchServe peer's custom handler (packed into a .mar at bench time; runs in .venv-bench).

TorchServe's frontend (Java) batches requests (``batchSize``, ``maxBatchDelay`` in the .mar's
model-config.yaml) and hands each Python worker a list of requests; this handler does the same
work per request and per batch as a modelsrv worker:

- ``initialize``: pin this worker to a free core (bench/pinning.py: TorchServe gives a worker no
  index), 1 torch thread, ``models.base.load_model(folder, "cpu")``, one warm-up batch;
- ``preprocess``: each request's JSON body (``{"inputs": {name: {"shape", "dtype", "data"}}}``,
  base64 tensor data, the body the load generator sends LitServe) decoded and put through the
  model's ``prepare``;
- ``inference``: the model's ``forward`` on the batch concatenated along dim 0;
- ``postprocess``: split back per request, each reply a JSON dict of base64 tensors.

The model folder, the thread count and the pinning directory come from the ``handler`` section of
model-config.yaml (``context.model_yaml_config``); ``repo`` is put on sys.path so the worker can
import the project's ``models`` package.
"""

from __future__ import annotations

import base64
import os
import sys


class ModelsrvPeerHandler:
    def __init__(self) -> None:
        self.model = None
        self.initialized = False

    def initialize(self, context) -> None:
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        repo = cfg.get("repo")
        if repo and repo not in sys.path:
            sys.path.insert(0, repo)
        if cfg.get("pin_dir"):
            from bench.pinning import pin_to_free_core

            self.core = pin_to_free_core(cfg["pin_dir"])
        import torch

        torch.set_num_threads(int(cfg.get("threads", 1)))
        from models.base import load_model

        self.model = load_model(cfg["folder"], "cpu")
        self.model.warmup()
        if cfg.get("pin_dir"):  # the harness counts these to know every worker is ready
            with open(os.path.join(cfg["pin_dir"], f"ready-{os.getpid()}"), "w") as f:
                f.write(f"core {getattr(self, 'core', None)}\n")
        self.initialized = True

    def preprocess(self, requests: list[dict]) -> list[dict]:
        import numpy as np

        prepared = []
        for row in requests:
            body = row.get("body") if row.get("body") is not None else row.get("data")
            if isinstance(body, (bytes, bytearray)):
                import json

                body = json.loads(body)
            arrays = {name: np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"])).reshape(t["shape"])
                      for name, t in body["inputs"].items()}
            prepared.append(self.model.prepare(arrays, {}))
        return prepared

    def inference(self, prepared: list[dict]) -> tuple[dict, list[int]]:
        import torch

        sizes = [next(iter(p.values())).shape[0] for p in prepared]
        batch = prepared[0] if len(prepared) == 1 else {k: torch.cat([p[k] for p in prepared]) for k in prepared[0]}
        return self.model.forward(batch, {}), sizes

    def postprocess(self, result: tuple[dict, list[int]]) -> list[dict]:
        outputs, sizes = result
        replies, offset = [], 0
        for n in sizes:
            reply = {}
            for name, t in outputs.items():
                a = t[offset : offset + n].numpy()
                reply[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "data": base64.b64encode(a.tobytes()).decode()}
            replies.append(reply)
            offset += n
        return replies

    def handle(self, data: list[dict], context) -> list[dict]:
        return self.postprocess(self.inference(self.preprocess(data)))
