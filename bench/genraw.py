"""Generation without a server, in one pinned process driven by JSON lines: the baselines.

    python bench/genraw.py --impl hf|bloom --folder F [--core 0] [--threads 1]
    stdin:  {"op": "run", "prompts": [[id, ...], ...], "max_new_tokens": 64}
    stdout: {"batch": B, "ttft_ms": ..., "step_ms": ..., "decode_tps": ..., "tps": ..., "total_s": ...}

- ``hf``: transformers' ``BloomForCausalLM.generate()`` on the folder (greedy, ``min_new_tokens`` =
  ``max_new_tokens`` so EOS cannot end it early; a batch is left-padded, as transformers pads for
  generation). The peer a user would write without a server.
- ``bloom``: modelsrv's own model (``models.bloom.Bloom.step`` on a paged KV cache, greedy argmax),
  the loop a scheduler runs with nothing around it: one prefill call for the whole batch, then one
  decode call per token. Its per-token step time is what modelsrv's time per output token is
  compared with (the server's cost per streamed token).

Times come from a hook called once per generated token position (a logits processor for
``generate()``, the loop itself for ``bloom``): ``ttft_ms`` is the start of the call to the first
token (tokenization excluded: the ids are given), ``step_ms`` the median time between two tokens,
``decode_tps`` = batch x (N - 1) / (last token - first token), ``tps`` = batch x N / total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return float("nan") if not n else (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


def summarize(batch: int, n: int, t0: float, marks: list[float], t_end: float) -> dict:
    steps = [b - a for a, b in zip(marks, marks[1:])]
    decode = marks[-1] - marks[0] if len(marks) > 1 else float("nan")
    return {"batch": batch, "max_new_tokens": n, "tokens": len(marks), "ttft_ms": (marks[0] - t0) * 1000,
            "step_ms": median(steps) * 1000, "decode_tps": batch * (len(marks) - 1) / decode if decode else float("nan"),
            "tps": batch * len(marks) / (t_end - t0), "total_s": t_end - t0}


class HF:
    def __init__(self, folder: str) -> None:
        import torch
        from transformers import AutoTokenizer, BloomForCausalLM, LogitsProcessor

        self.torch = torch
        self.net = BloomForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 3

        class Mark(LogitsProcessor):
            def __init__(self) -> None:
                self.marks: list[float] = []

            def __call__(self, input_ids, scores):
                self.marks.append(time.perf_counter())
                return scores

        self.Mark = Mark

    def run(self, prompts: list[list[int]], n: int) -> dict:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        mark = self.Mark()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=self.pad, logits_processor=[mark])
        t_end = time.perf_counter()
        res = summarize(len(prompts), n, t0, mark.marks, t_end)
        res["generated"] = int(out.shape[1] - width)
        return res


class Raw:
    """modelsrv's Bloom.step in a bare loop: what the engine's forward costs per token, nothing else."""

    def __init__(self, folder: str) -> None:
        import torch

        from models.base import load_model
        from models.bloom import SeqStep

        self.torch, self.SeqStep = torch, SeqStep
        self.model = load_model(folder, "cpu")
        self.model.warmup()

    def run(self, prompts: list[list[int]], n: int) -> dict:
        torch, SeqStep = self.torch, self.SeqStep
        bs = 16
        per_seq = -(-(max(len(p) for p in prompts) + n) // bs)
        cache = self.model.allocate_kv_cache(per_seq * len(prompts), bs)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
        marks: list[float] = []
        t0 = time.perf_counter()
        logits = self.model.step(cache, [SeqStep(list(p), 0, t) for p, t in zip(prompts, tables)])
        nxt = torch.argmax(logits, dim=-1).tolist()
        marks.append(time.perf_counter())
        lens = [len(p) for p in prompts]
        for _ in range(n - 1):
            logits = self.model.step(cache, [SeqStep([tk], ln, t) for tk, ln, t in zip(nxt, lens, tables)])
            lens = [ln + 1 for ln in lens]
            nxt = torch.argmax(logits, dim=-1).tolist()
            marks.append(time.perf_counter())
        t_end = time.perf_counter()
        return summarize(len(prompts), n, t0, marks, t_end)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("hf", "bloom"), required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--core", type=int, default=None, help="pin to this core (index into the allowed cores)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.core is not None:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, [cores[args.core % len(cores)]])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    impl = HF(args.folder) if args.impl == "hf" else Raw(args.folder)
    impl.run([[5, 6, 7, 8]], 4)  # first calls: allocator, oneDNN primitives
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = None
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "torch": torch.__version__,
                                 "transformers": version}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            reply = impl.run(cmd["prompts"], int(cmd["max_new_tokens"]))
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
