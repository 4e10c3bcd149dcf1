"""Tensor parallelism for BLOOM: the pieces of Megatron's ``mpu``, written for inference.

A group of k processes (ranks) holds one model: every rank builds ``BloomForCausalLM`` with a
``DistParallel`` (``models.bloom.Parallel`` of size k), so that

* ``query_key_value`` and ``dense_h_to_4h`` are column-parallel (rows split: heads, 4h features;
  BLOOM's per-head ``[q, k, v]`` interleave makes a head split one contiguous row slice), no
  communication;
* ``dense`` and ``dense_4h_to_h`` are row-parallel (columns split); their partial products go
  through one all-reduce, then the bias is added once (``bloom.row_parallel``);
* the word embeddings are vocab-parallel (``VocabParallelEmbedding``: each rank looks up its
  vocabulary range, zeros elsewhere, one all-reduce), and so is the tied ``lm_head``;
* the ALiBi slopes are sliced per rank (the rank's heads), the KV cache holds the rank's heads.

Each rank reads only its slice of every tensor from the same safetensors files
(``safe_open(...).get_slice``): ``load_bloom_shard``.

Decoding never gathers the full logits when it need not (``candidates`` + ``sample_parallel``):
greedy and top-k reduce per rank first (each rank's best ``kk`` values and ids are all-gathered, a
[k, rows, kk] exchange), and log-probabilities use the global max (from those candidates) and the
sum of exponentials all-reduced across ranks, as Megatron's vocab-parallel cross entropy does.
Sampling from the full distribution (no top-k), top-p and the repetition penalty do gather the
logits (``all_gather_last``): they need every token's score.

Rank 0 drives: ``TensorParallelBloom`` has the API of ``models.bloom.Bloom`` (KServe ``prepare`` /
``forward``, ``allocate_kv_cache`` / ``step``, plus ``step_sample``); each call first broadcasts a
small header and the inputs (a fixed [4] int64 header, then one int64 payload) to the other ranks,
which run ``follow`` — a loop that receives each op and makes the same model calls, so the
collectives inside meet in lockstep. Control messages travel on a gloo group (on CUDA the compute
collectives use NCCL).

Group set-up: ``init_group`` (arguments) or ``group_from_env`` (``MODELSRV_TP_RANK``,
``MODELSRV_TP_SIZE``, ``MODELSRV_TP_PORT``, optional ``MODELSRV_TP_FD`` — a listening socket the
TCPStore server on rank 0 adopts, so that the port is never raced for — ``MODELSRV_TP_BACKEND``,
``MODELSRV_TP_TIMEOUT``). Rendezvous and gloo's own connections stay on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.bloom import Bloom, BloomConfig, BloomForCausalLM, KVCache, Parallel, SeqStep
from models.sampling import SamplingParams, sample, top_logprobs
from models.weights import build_on_meta, load_into, weight_files

__all__ = [
    "DistParallel",
    "GroupBroken",
    "SamplePlan",
    "TensorParallelBloom",
    "VocabParallelEmbedding",
    "candidates",
    "follow",
    "group_from_env",
    "init_group",
    "load_bloom_shard",
    "sample_parallel",
    "shard_spec",
    "step_sample",
]

log = logging.getLogger("modelsrv.tp")
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# The group and its collectives
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistParallel(Parallel):
    """A rank of a torch.distributed group: the collectives BLOOM's seams call, plus the control channel.

    ``group``: the compute group (gloo on CPU, NCCL on CUDA); ``control``: a gloo group for the
    headers rank 0 broadcasts (CPU tensors whatever the device).
    """

    group: Any = field(default=None, compare=False, repr=False)
    control: Any = field(default=None, compare=False, repr=False)
    device: str = "cpu"

    # Megatron's mappings, forward only: identity forward / all-reduce, all-gather
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's ``t`` (same shape on every rank)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def embedding(self, vocab_size: int, hidden_size: int) -> nn.Module:
        return VocabParallelEmbedding(vocab_size, hidden_size, self)

    # control: rank 0 -> the others
    def broadcast_ints(self, values: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
        """Rank 0 sends ``values`` (int64, 1-d); the others receive ``n`` of them."""
        t = values.contiguous() if self.rank == 0 else torch.empty(n, dtype=torch.long)
        dist.broadcast(t, src=0, group=self.control)
        return t

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_group(rank: int, size: int, port: int, backend: str = "gloo", listen_fd: int | None = None,
               timeout: float = 120.0, device: str = "cpu") -> DistParallel:
    """Join (rank 0: host) the rendezvous on 127.0.0.1:``port`` and build the group.

    ``listen_fd``: a socket already bound and listening on ``port`` (rank 0 only) that the TCPStore
    server adopts instead of binding — the master binds it, so no other group can take the port.
    ``timeout`` bounds the rendezvous and every collective (a peer that is gone fails them).
    """
    if not 0 <= rank < size:
        raise ValueError(f"tensor parallel: rank {rank} outside a group of {size}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair connections on loopback, not eth0
    td = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(LOOPBACK, port, size, is_master=rank == 0, timeout=td, wait_for_workers=True,
                          master_listen_fd=listen_fd if rank == 0 else None, use_libuv=listen_fd is None)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size, timeout=td)
    group = dist.group.WORLD
    control = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=td)
    return DistParallel(size=size, rank=rank, group=group, control=control, device=device)


def group_from_env(device: str = "cpu") -> DistParallel | None:
    """The group the master described in the environment, or None when this process is in none."""
    if "MODELSRV_TP_SIZE" not in os.environ:
        return None
    fd = os.environ.get("MODELSRV_TP_FD")
    return init_group(int(os.environ["MODELSRV_TP_RANK"]), int(os.environ["MODELSRV_TP_SIZE"]),
                      int(os.environ["MODELSRV_TP_PORT"]),
                      os.environ.get("MODELSRV_TP_BACKEND", "nccl" if device.startswith("cuda") else "gloo"),
                      int(fd) if fd else None, float(os.environ.get("MODELSRV_TP_TIMEOUT", "120")), device)


class VocabParallelEmbedding(nn.Module):
    """Megatron's ``VocabParallelEmbedding``: this rank's rows; ids outside them look up zeros; one all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: DistParallel) -> None:
        super().__init__()
        self.parallel = parallel
        self.lo, self.hi = parallel.vocab_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.lo) | (ids >= self.hi)
        local = (ids - self.lo).masked_fill(outside, 0)
        out = F.embedding(local, self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(out)  # exactly one non-zero term per row: the sum is the lookup


# ------------------------------------------------------------------------------------------------
# Sharded loading
# ------------------------------------------------------------------------------------------------
def shard_spec(name: str, cfg: BloomConfig, parallel: Parallel) -> tuple[int, int, int] | None:
    """(dim, start, stop) of ``name``'s slice on this rank, or None for a replicated tensor."""
    r, k = parallel.rank, parallel.size
    if name in ("transformer.word_embeddings.weight", "lm_head.weight"):
        lo, hi = parallel.vocab_range(cfg.vocab_size)
        return 0, lo, hi
    per_head = 3 * cfg.head_dim * parallel.split(cfg.n_head, "n_head")  # q, k, v rows of this rank's heads
    inner = parallel.split(4 * cfg.hidden_size, "4 * hidden_size")
    if name.endswith(("self_attention.query_key_value.weight", "self_attention.query_key_value.bias")):
        return 0, r * per_head, (r + 1) * per_head
    if name.endswith("self_attention.dense.weight"):
        cols = cfg.hidden_size // k
        return 1, r * cols, (r + 1) * cols
    if name.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")):
        return 0, r * inner, (r + 1) * inner
    if name.endswith("mlp.dense_4h_to_h.weight"):
        return 1, r * inner, (r + 1) * inner
    return None  # LayerNorms and the biases of the row-parallel layers (added once, after the all-reduce)


def load_bloom_shard(folder: Path, cfg: BloomConfig, device: torch.device, parallel: Parallel) -> BloomForCausalLM:
    """Build this rank's shard on meta and assign only its slices, read with ``get_slice`` from the safetensors files."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding slice is the head (transformers ignores a stored copy)
                spec = shard_spec(name, cfg, parallel)
                sl = f.get_slice(key)
                if spec is None:
                    t = sl[:]
                elif spec[0] == 0:
                    t = sl[spec[1]:spec[2]]
                else:
                    t = sl[:, spec[1]:spec[2]]
                state[name] = t.to(cfg.dtype)
    tied = "lm_head.weight" not in state
    if tied and "transformer.word_embeddings.weight" in state:
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    net = build_on_meta(lambda: BloomForCausalLM(cfg, parallel))
    load_into(net, state, device)
    if tied:
        net.lm_head.weight = net.transformer.word_embeddings.weight
    net.slopes = net.slopes.to(device)
    return net


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's distinct parameters (a tied head counted once)."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------
# Vocab-parallel decoding reductions
# ------------------------------------------------------------------------------------------------
def candidates(local: torch.Tensor, kk: int, parallel: Parallel, lo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's best ``kk`` logits per row, gathered, and the log-sum-exp of the full rows.

    local: fp32 [rows, V/k] (this rank's vocabulary ``lo..``). Returns (values [rows, k*kk], global
    ids [rows, k*kk], lse [rows]) on every rank. Column 0 of each rank's block is its row max at the
    first index holding it (``max``), so the lowest id of the global max is always a candidate
    (argmax over the full row returns the first maximum). Two collectives: one all-gather of
    [rows, 2*kk] (values and ids), one all-reduce of [rows] (sum of exp(x - global max)), as
    Megatron's vocab-parallel cross entropy.
    """
    rows, width = local.shape
    kk = max(1, min(kk, width))
    vals, idx = local.topk(kk, dim=-1)
    vals[:, 0], idx[:, 0] = local.max(dim=-1)
    idx = idx + lo
    if parallel.size == 1:
        return vals, idx, torch.logsumexp(local, dim=-1)
    both = torch.cat([vals.double(), idx.double()], dim=1)  # ids < 2^53: exact in double
    g = parallel.all_gather(both)  # [k, rows, 2*kk]
    vals = g[:, :, :kk].permute(1, 0, 2).reshape(rows, -1).float()
    ids = g[:, :, kk:].permute(1, 0, 2).reshape(rows, -1).long()
    gmax = vals.max(dim=-1).values
    sumexp = torch.exp(local - gmax[:, None]).sum(dim=-1)
    parallel.all_reduce(sumexp)
    return vals, ids, gmax + torch.log(sumexp)


@dataclass(frozen=True)
class SamplePlan:
    """What every rank must do with a step's logits; rank 0 decides it and broadcasts it."""

    gather: bool  # some row needs the full distribution: all-gather the logits
    kk: int  # candidates per rank otherwise

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SamplePlan:
        gather = any(p.repetition_penalty != 1.0 or p.top_p < 1.0 or (not p.greedy and p.top_k is None) for p in params)
        kk = max([1] + [p.top_k for p in params if not p.greedy and p.top_k is not None]
                 + [p.num_top_logprobs for p in params])
        return cls(gather, kk)


def sample_parallel(local: torch.Tensor, params: Sequence[SamplingParams], previous: Sequence[Sequence[int]],
                    generators: Sequence[torch.Generator | None] | None, parallel: Parallel, lo: int, vocab: int,
                    plan: SamplePlan | None = None) -> tuple[list[int], list[float], list[list[tuple[int, float]]]] | None:
    """``models.sampling.sample`` on vocab-parallel logits: every rank calls it; rank 0 gets the result.

    Returns (token ids, their log-probabilities under the raw logits, each row's top
    ``num_top_logprobs`` (id, log-probability)) on rank 0, None on the others. Greedy and top-k
    rows exchange candidates only; the chosen token is drawn by the same ``sample`` over a row that
    is -inf outside the candidates, so seeded draws equal the unsharded model's.
    """
    plan = plan or SamplePlan.of(params)
    if plan.gather:
        full = parallel.all_gather_last(local) if parallel.size > 1 else local
        if parallel.rank != 0:
            return None
        ids, logprobs = sample(full, params, previous, generators)
        lsm = torch.log_softmax(full, dim=-1)
        tops = []
        for i, p in enumerate(params):
            n = p.num_top_logprobs
            v, t = lsm[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
            tops.append(list(zip(t.tolist(), v.tolist())))
        return ids, logprobs, tops
    vals, cand, lse = candidates(local, plan.kk, parallel, lo)
    if parallel.rank != 0:
        return None
    sparse = torch.full((local.shape[0], vocab), float("-inf"), dtype=torch.float32, device=local.device)
    sparse.scatter_(1, cand, vals)
    ids, _ = sample(sparse, params, previous, generators)
    chosen = torch.tensor(ids, device=local.device)
    logprobs = (sparse.gather(1, chosen[:, None])[:, 0] - lse).tolist()
    tops = []
    for i, p in enumerate(params):
        n = p.num_top_logprobs
        if n:
            v, t = sparse[i].topk(n)
            tops.append(list(zip(t.tolist(), (v - lse[i]).tolist())))
        else:
            tops.append([])
    return ids, logprobs, tops


# ------------------------------------------------------------------------------------------------
# Lockstep: rank 0's proxy and the followers' loop
# ------------------------------------------------------------------------------------------------
OP_STOP, OP_FORWARD, OP_ALLOC, OP_STEP, OP_NOOP = range(5)
MODE_LOGITS, MODE_SAMPLE = 0, 1
HEADER = 4  # [op, payload length, a, b]


def _encode_seqs(seqs: Sequence[SeqStep]) -> list[int]:
    out = [len(seqs)]
    for s in seqs:
        out += [len(s.new_tokens), s.num_cached, len(s.block_table), *s.new_tokens, *s.block_table]
    return out


def _decode_seqs(v: list[int], at: int) -> list[SeqStep]:
    n = v[at]
    at += 1
    seqs = []
    for _ in range(n):
        nt, nc, nb = v[at:at + 3]
        at += 3
        seqs.append(SeqStep(v[at:at + nt], nc, v[at + nt:at + nt + nb]))
        at += nt + nb
    return seqs


class GroupBroken(RuntimeError):
    """A collective failed (a rank died or timed out): this group cannot serve until it is restarted."""


class TensorParallelBloom:
    """Rank 0's face of a tensor-parallel BLOOM: the ``Bloom`` API, each call broadcast to the followers first.

    The generation engine and the KServe batcher call it as they would call a ``Bloom``
    (``prepare``, ``forward``, ``allocate_kv_cache``, ``step``, ``kv_bytes_per_token`` ...).
    ``step_sample`` is ``step`` + ``models.sampling.sample`` without gathering the logits where
    the sampling does not need them. Calls are serialized (one lock): the followers replay them in
    order. Inputs are validated before anything is broadcast, so a bad request never reaches the
    followers; a failed collective marks the group broken (``GroupBroken``).
    """

    def __init__(self, model: Bloom, parallel: DistParallel) -> None:
        if parallel.rank != 0:
            raise ValueError("TensorParallelBloom runs on rank 0; the other ranks run follow()")
        self.model = model
        self.parallel = parallel
        self.lock = threading.Lock()
        self.caches = 0
        self.freed: list[int] = []
        self.broken: str | None = None
        self.lo, _ = parallel.vocab_range(model.vocab_size)
        self.stats = {"steps": 0, "gathered_steps": 0, "broadcast_s": 0.0}
        self.last_send = time.monotonic()
        self.keepalive: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:  # model_type, inputs, outputs, tokenizer, vocab_size, ...
        return getattr(self.model, name)

    @property
    def tensor_parallel(self) -> int:
        return self.parallel.size

    # -- the channel to the followers ---------------------------------------------------------------
    def _send(self, op: int, payload: Sequence[int], a: int = 0, b: int = 0) -> None:
        if self.broken:
            raise GroupBroken(f"tensor-parallel group broken: {self.broken}")
        freed, self.freed = self.freed, []
        body = [len(freed), *freed, *payload]
        started = time.perf_counter()
        try:
            self.parallel.broadcast_ints(torch.tensor([op, len(body), a, b], dtype=torch.long))
            self.parallel.broadcast_ints(torch.tensor(body, dtype=torch.long))
        except Exception as exc:
            self._break(exc)
        self.stats["broadcast_s"] += time.perf_counter() - started
        self.last_send = time.monotonic()

    def start_keepalive(self, interval: float) -> None:
        """Ping the followers when idle for ``interval`` s: an idle follower waits in a broadcast, and
        every collective has a timeout (``init_group``); a dead follower is also noticed sooner."""

        def run() -> None:
            while not self.broken:
                time.sleep(min(interval, max(0.05, self.last_send + interval - time.monotonic())))
                if time.monotonic() - self.last_send < interval:
                    continue
                with self.lock:
                    if self.broken or time.monotonic() - self.last_send < interval:
                        continue
                    try:
                        self._send(OP_NOOP, [])
                    except GroupBroken:
                        return

        self.keepalive = threading.Thread(target=run, name="tp-keepalive", daemon=True)
        self.keepalive.start()

    def _break(self, exc: BaseException) -> None:
        self.broken = f"{type(exc).__name__}: {exc}"
        raise GroupBroken(f"tensor-parallel group broken: {self.broken}") from exc

    def _run(self, fn, *args):
        """Rank 0's share of a broadcast op: once the followers have it, any failure leaves them out of step."""
        try:
            return fn(*args)
        except Exception as exc:
            self._break(exc)

    # -- KServe -------------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.prepare(inputs, parameters)

    def batch_key(self, prepared: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> Any:
        return self.model.batch_key(prepared, parameters)

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self.lock:
            self._send(OP_FORWARD, [*ids.reshape(-1).tolist(), *mask.reshape(-1).tolist()], *ids.shape)
            return self._run(self.model.forward, batch, parameters)

    def example_inputs(self, batch_size: int = 1) -> dict[str, Any]:
        return self.model.example_inputs(batch_size)

    def warmup(self) -> None:
        with torch.inference_mode():
            self.forward(self.prepare(self.example_inputs(1), {}), {})
        cache = self.allocate_kv_cache(2, 8)
        self.step(cache, [SeqStep([0, 1, 2], 0, [0]), SeqStep([3], 4, [1])])
        self.free_kv_cache(cache)

    # -- generation ---------------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        with self.lock:
            self.caches += 1
            cid = self.caches
            self._send(OP_ALLOC, [cid, num_blocks, block_size])
            cache = self.model.allocate_kv_cache(num_blocks, block_size)
        cache.tp_id = cid  # type: ignore[attr-defined]
        return cache

    def free_kv_cache(self, cache: KVCache) -> None:
        """The followers drop their part of ``cache`` with the next call (no broadcast of its own)."""
        self.freed.append(cache.tp_id)  # type: ignore[attr-defined]

    def _check(self, cache: KVCache, seqs: Sequence[SeqStep]) -> None:
        from models.base import InputError

        self.model.check_step(cache, seqs)
        for s in seqs:
            if min(s.new_tokens) < 0 or max(s.new_tokens) >= self.model.vocab_size:
                raise InputError(f"token id outside [0, {self.model.vocab_size})")

    @torch.inference_mode()
    def step(self, cache: KVCache, seqs: list[SeqStep]) -> torch.Tensor:
        """Full fp32 logits [len(seqs), vocab] (gathered); prefer ``step_sample`` for decoding."""
        self._check(cache, seqs)
        with self.lock:
            self._send(OP_STEP, [cache.tp_id, MODE_LOGITS, 0, 0, *_encode_seqs(seqs)])  # type: ignore[attr-defined]
            return self._run(lambda: self.parallel.all_gather_last(self.model.step_local(cache, seqs)))

    @torch.inference_mode()
    def step_sample(self, cache: KVCache, seqs: list[SeqStep], params: Sequence[SamplingParams],
                    previous: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None] | None = None,
                    ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
        """One step and the next token of each sequence: (ids, log-probabilities, top log-probabilities)."""
        self._check(cache, seqs)
        plan = SamplePlan.of(params)
        with self.lock:
            self._send(OP_STEP, [cache.tp_id, MODE_SAMPLE, int(plan.gather), plan.kk, *_encode_seqs(seqs)])  # type: ignore[attr-defined]
            self.stats["steps"] += 1
            self.stats["gathered_steps"] += plan.gather  # full logits crossed ranks (top-p, penalty, untruncated sampling)

            def run():
                local = self.model.step_local(cache, seqs)
                return sample_parallel(local, params, previous, generators, self.parallel, self.lo,
                                       self.model.vocab_size, plan)

            return self._run(run)

    def close(self) -> None:
        """Tell the followers to leave their loop (a graceful end of the group)."""
        with self.lock:
            if self.broken:
                return
            try:
                self._send(OP_STOP, [])
            except GroupBroken:
                pass
            self.broken = "closed"


def step_sample(model: Any, cache: KVCache, seqs: list[SeqStep], params: Sequence[SamplingParams],
                previous: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None] | None = None,
                ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """The one call a generation engine needs for both a ``Bloom`` and a ``TensorParallelBloom``."""
    if isinstance(model, TensorParallelBloom):
        return model.step_sample(cache, seqs, params, previous, generators)
    logits = model.step(cache, seqs)
    ids, logprobs = sample(logits, params, previous, generators)
    tops = [top_logprobs(logits[i:i + 1], p.num_top_logprobs)[0] for i, p in enumerate(params)]
    return ids, logprobs, tops


def follow(model: Bloom, parallel: DistParallel, alive: threading.Event | None = None,
           progress: list[float] | None = None) -> None:
    """A follower rank's loop: receive each op from rank 0 and make the same model calls, until OP_STOP.

    ``progress[0]`` is set to the time each op was received and to 0.0 while waiting for one (a
    heartbeat can tell a wedged computation from an idle follower). Any exception (rank 0 gone, a
    collective timed out) propagates: the group is broken and this process should exit.
    """
    caches: dict[int, KVCache] = {}
    lo, _ = parallel.vocab_range(model.vocab_size)
    while alive is None or alive.is_set():
        if progress is not None:
            progress[0] = 0.0
        op, n, a, b = parallel.broadcast_ints(None, HEADER).tolist()
        if progress is not None:
            progress[0] = time.monotonic()
        body = parallel.broadcast_ints(None, n).tolist()
        nfree = body[0]
        for cid in body[1:1 + nfree]:
            caches.pop(cid, None)
        v = body[1 + nfree:]
        if op == OP_STOP:
            return
        if op == OP_NOOP:
            continue
        if op == OP_FORWARD:
            ids = torch.tensor(v[:a * b], dtype=torch.long).view(a, b)
            mask = torch.tensor(v[a * b:], dtype=torch.long).view(a, b)
            model.forward({"input_ids": ids, "attention_mask": mask}, {})
        elif op == OP_ALLOC:
            caches[v[0]] = model.allocate_kv_cache(v[1], v[2])
        elif op == OP_STEP:
            cid, mode, gather, kk = v[:4]
            seqs = _decode_seqs(v, 4)
            with torch.inference_mode():
                local = model.step_local(caches[cid], seqs)
                if mode == MODE_LOGITS or gather:
                    parallel.all_gather_last(local)
                else:
                    candidates(local, kk, parallel, lo)
        else:
            raise RuntimeError(f"tensor parallel: unknown op {op} from rank 0")
