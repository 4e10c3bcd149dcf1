"""The hand-rolled peer: FastAPI + uvicorn, as most users write it first (runs in .venv-bench).

    PYTHONPATH=. .venv-bench/bin/python bench/fastapi_app.py --folder F --port P [--workers 2]

``uvicorn.run("bench.fastapi_app:app", workers=2)`` (= ``uvicorn --workers 2``): a supervisor
process and 2 worker processes, each with its own copy of the model, loaded at startup with
``models.base.load_model(folder, "cpu")`` and 1 torch thread. No batching: each request runs the
model's ``prepare`` and ``forward`` on its own tensors, inline in the endpoint. The endpoint is a
plain ``def`` with a pydantic body (FastAPI's documented way for blocking work: it runs in
FastAPI's thread pool); ``--style async`` makes it ``async def`` reading ``request.json()`` and
running the model on the event loop instead. Request and reply: JSON with base64 tensors, the
body the load generator sends to LitServe (``{"inputs": {name: {"shape", "dtype", "data"}}}``).

uvicorn gives a worker no index, so each worker pins itself to the first core whose lock file
in ``--run-dir`` it can take (bench/pinning.py): one core each. When its model is loaded and
warm, a worker writes ``ready-<pid>`` there (the harness waits for one per worker). Settings
reach the workers by environment (they import this module anew).
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel

ENV = "MODELSRV_BENCH_FASTAPI_"
STATE: dict = {}


class TensorIn(BaseModel):
    shape: list[int]
    dtype: str
    data: str


class PredictIn(BaseModel):
    inputs: dict[str, TensorIn]


@asynccontextmanager
async def lifespan(app: FastAPI):
    run_dir = os.environ.get(ENV + "RUN_DIR", "")
    if run_dir and os.environ.get(ENV + "PIN") == "1":
        from bench.pinning import pin_to_free_core

        STATE["core"] = pin_to_free_core(run_dir)
    import torch

    torch.set_num_threads(int(os.environ.get(ENV + "THREADS", "1")))
    from models.base import load_model

    model = load_model(os.environ[ENV + "FOLDER"], "cpu")
    model.warmup()
    STATE["model"] = model
    if run_dir:  # the harness counts these to know every worker is ready
        with open(os.path.join(run_dir, f"ready-{os.getpid()}"), "w") as f:
            f.write(f"core {STATE.get('core')}\n")
    yield
    STATE.clear()


app = FastAPI(lifespan=lifespan)


def infer(inputs: dict[str, dict]) -> dict:
    model = STATE["model"]
    arrays = {name: np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"])).reshape(t["shape"])
              for name, t in inputs.items()}
    outputs = model.forward(model.prepare(arrays, {}), {})
    return {name: {"shape": list(t.shape), "dtype": str(t.numpy().dtype),
                   "data": base64.b64encode(t.numpy().tobytes()).decode()} for name, t in outputs.items()}


if os.environ.get(ENV + "STYLE", "def") == "async":
    @app.post("/predict")
    async def predict_async(request: Request) -> dict:
        body = await request.json()
        return infer(body["inputs"])
else:
    @app.post("/predict")
    def predict(body: PredictIn) -> dict:
        return infer({name: t.model_dump() for name, t in body.inputs.items()})


@app.get("/health")
def health() -> dict:
    return {"ok": "model" in STATE}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--style", choices=("def", "async"), default="def")
    ap.add_argument("--run-dir", default="",
                    help="the workers' core locks and ready-<pid> markers (default: a new temp dir)")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    args = ap.parse_args()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="fastapi-peer-")
    os.makedirs(run_dir, exist_ok=True)
    os.environ.update({ENV + "FOLDER": args.folder, ENV + "THREADS": str(args.threads), ENV + "STYLE": args.style,
                       ENV + "RUN_DIR": run_dir, ENV + "PIN": "1" if args.pin else "0"})
    import uvicorn

    uvicorn.run("bench.fastapi_app:app", host="127.0.0.1", port=args.port, workers=args.workers, log_level="warning")


if __name__ == "__main__":
    main()
