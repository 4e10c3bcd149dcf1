"""BLOOM (BigScience), servable as ``model_type: bloom``: a KServe logits model and a paged-KV generation API.

Re-implemented in plain torch from the description of transformers' ``BloomForCausalLM``
(``models/bloom/modeling_bloom.py``); parameter names are that module's ``state_dict`` names, so a
Hub folder (``config.json`` + ``model.safetensors`` or safetensors shards) loads unchanged.

What makes BLOOM's numbers (all kept, so logits match the reference to float rounding):

* no position embeddings: ALiBi adds ``slope[h] * key_position`` to every attention score. The
  query position is left out on purpose (softmax is invariant to a per-row constant), and key
  positions count real tokens only: ``cumsum(attention_mask) - 1`` for a left-padded batch;
* slopes are the ALiBi paper's geometric series for the largest power of two <= n_head, plus the
  odd powers of the next series for the remaining heads (non powers of two, e.g. 6 or 112 heads);
* a LayerNorm right after the word embeddings (``word_embeddings_layernorm``);
* the fused ``query_key_value`` output is laid out per head as ``[n_head, 3, head_dim]``
  (not ``[3, n_head, head_dim]``): one head's q, k, v are adjacent rows of the weight, which is
  also what makes a head-wise (Megatron) split of that weight a contiguous row slice;
* scores = ``baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(head_dim))`` in the model dtype, then an
  additive mask of ``finfo(dtype).min`` and a softmax computed in fp32 and cast back;
* GELU is Megatron's tanh approximation with the constant 0.79788456 (not torch's exact sqrt(2/pi));
* ``apply_residual_connection_post_layernorm`` (False for every released BLOOM) is supported.

KServe request: ``input_ids`` INT64 [N, T], optional ``attention_mask`` INT64 [N, T] of 0/1
(default all ones; left padding as transformers does it). Response: ``logits`` FP32 [N, T, vocab].

Generation API (the contract the scheduler codes against)
--------------------------------------------------------

::

    model = load_model(folder)                    # a Bloom
    model.tokenizer: models.text.Tokenizer | None # from tokenizer.json (+ tokenizer_config.json)
    model.eos_token_id: int | None
    model.max_model_len: int                      # the context length in tokens
    model.vocab_size: int                         # logits width (BLOOM pads it above the tokenizer's)
    model.kv_bytes_per_token() -> int             # bytes of K+V one token takes over all layers
    cache = model.allocate_kv_cache(num_blocks, block_size=16) -> KVCache
                                                  # cache.key(layer), cache.value(layer):
                                                  # [n_local_heads, num_blocks, block_size, head_dim]
    logits = model.step(cache, [SeqStep(new_tokens, num_cached, block_table), ...])
                                                  # fp32 [len(seqs), vocab]: each sequence's LAST new token

``step`` writes the K/V of every new token at position ``p = num_cached + i`` into slot
``block_table[p // block_size] * block_size + p % block_size`` and attends over positions
``0 .. num_cached + len(new_tokens) - 1`` of that sequence, causally, with ALiBi on the true
positions. One call may mix prefills (the whole prompt, ``num_cached = 0``), recomputes after a
preemption (any suffix, ``num_cached`` > 0 with its K/V still in the blocks) and decodes (one token).
The cache holds no per-sequence state: the block tables are the scheduler's; two sequences may share
blocks holding the same prefix (they only read them) but must not write the same slot in one call.
Logits come back on the model's device. Around it: ``models.text`` (Tokenizer, chat template,
IncrementalDetokenizer, find_stop / TextStream) and ``models.sampling`` (SamplingParams, sample).

Errors: ``InputError`` for a token id outside the vocabulary or a context longer than
``max_model_len`` (a client's prompt); ``ValueError`` for a malformed call (empty ``new_tokens``, a
block table too short or naming a block outside the cache) — a scheduler bug.

Tensor parallelism (not built yet, planned Megatron-style): every module takes a ``Parallel``; the
attention holds ``n_head // tp_size`` heads (``query_key_value`` split by head rows, ``dense`` by
columns), the MLP a ``1/tp_size`` slice of the 4h features (``dense_h_to_4h`` by rows,
``dense_4h_to_h`` by columns); the two row-parallel outputs go through ``Parallel.all_reduce`` before
their bias is added; the embedding and the tied ``lm_head`` would be vocab-parallel (logits through
``Parallel.all_gather_last``; ``BloomModel`` refuses size > 1 until that lookup is written). With
``Parallel()`` (size 1) every seam is the identity.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import InputError, Model, RequestTensor, TensorSpec
from models.weights import (
    build_on_meta,
    check_state,
    load_into,
    plain_state_dict,
    read_state_dict,
    torch_load_tensors,
    write_model_folder,
)

if TYPE_CHECKING:
    from models.text import Tokenizer

__all__ = [
    "Bloom",
    "BloomConfig",
    "BloomForCausalLM",
    "KVCache",
    "Parallel",
    "SeqStep",
    "alibi_slopes",
    "convert_bloom",
    "random_bloom_folder",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float": torch.float32, "half": torch.float16}
DEFAULT_CONTEXT = 2048  # BLOOM was trained on 2048-token sequences; used when the config names no length


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BloomConfig:
    """Hyper-parameters read from a transformers ``config.json`` (today's keys or bigscience's legacy ones)."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_head: int = 8
    n_layer: int = 2
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    max_model_len: int = DEFAULT_CONTEXT
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], dtype: str | torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> BloomConfig:
        """Validate a config.json dict. Synonyms (BloomConfig's ``attribute_map`` and the legacy
        ``n_embed``) are accepted; two different values for one field are an error.

        dtype: the ``dtype`` argument, else config ``dtype`` (the model block's directive; also the
        key transformers 5 writes), else config ``torch_dtype`` on CUDA only: on the CPU the default
        is float32, because CPU half-precision matmuls are slow (bloom-560m's config says float16).
        """

        def pick(name: str, *aliases: str, default: Any = None) -> Any:
            found = {k: config[k] for k in (name, *aliases) if config.get(k) is not None}
            if len({json.dumps(v) for v in found.values()}) > 1:
                raise ValueError(f"bloom config: conflicting values for {name}: {found}")
            return next(iter(found.values())) if found else default

        def pos_int(name: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"bloom config: {name} must be a positive integer, got {value!r}")
            return value

        def token_id(name: str) -> int | None:
            v = config.get(name, getattr(cls, name))
            if isinstance(v, list):  # generation configs allow several eos ids; the first is "the" one
                v = v[0] if v else None
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"bloom config: {name} must be a token id, got {v!r}")
            return v

        hidden = pos_int("hidden_size", pick("hidden_size", "n_embed", default=cls.hidden_size))
        n_head = pos_int("n_head", pick("n_head", "num_attention_heads", default=cls.n_head))
        n_layer = pos_int("n_layer", pick("n_layer", "num_hidden_layers", default=cls.n_layer))
        vocab = pos_int("vocab_size", config.get("vocab_size", cls.vocab_size))
        if hidden % n_head:
            raise ValueError(f"bloom config: hidden_size {hidden} is not divisible by n_head {n_head}")
        if config.get("slow_but_exact") and int(config.get("pretraining_tp", 1)) > 1:
            raise ValueError("bloom config: slow_but_exact with pretraining_tp > 1 is not supported")
        context = pick("seq_length", default=None)
        if context is None:
            context = pick("max_model_len", "n_positions", default=DEFAULT_CONTEXT)
        eps = config.get("layer_norm_epsilon", cls.layer_norm_epsilon)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"bloom config: layer_norm_epsilon must be a positive number, got {eps!r}")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            n_head=n_head,
            n_layer=n_layer,
            layer_norm_epsilon=float(eps),
            apply_residual_connection_post_layernorm=bool(config.get("apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
            max_model_len=pos_int("max_model_len", context),
            dtype=parse_dtype(dtype if dtype is not None else config.get("dtype") or (
                config.get("torch_dtype") if torch.device(device).type == "cuda" else None)),
        )

    def to_json(self) -> dict[str, Any]:
        """A config.json that both this module and transformers' ``BloomConfig`` read."""
        return {
            "model_type": "bloom",
            "architectures": ["BloomForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "apply_residual_connection_post_layernorm": self.apply_residual_connection_post_layernorm,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "slow_but_exact": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "seq_length": self.max_model_len,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """float32 / float16 / bfloat16 (or fp32, fp16, bf16); None and "auto" mean float32."""
    if isinstance(value, torch.dtype):
        if value not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"bloom: unsupported dtype {value}")
        return value
    if value is None or value == "auto":
        return torch.float32
    if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"bloom: dtype must be one of float32, float16, bfloat16; got {value!r}")
    return DTYPES[value.removeprefix("torch.")]


# ------------------------------------------------------------------------------------------------
# Tensor-parallel seam
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallel:
    """Where a tensor-parallel BLOOM would talk to its peers; size 1 (the only one built now) is the identity.

    Megatron layout: column-parallel ``query_key_value``/``dense_h_to_4h`` (rows = heads / features
    split, no communication), row-parallel ``dense``/``dense_4h_to_h`` (columns split, partial sums
    all-reduced, bias added once after), vocab-parallel embedding and ``lm_head``.
    """

    size: int = 1
    rank: int = 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks (in place where possible) and return it."""
        if self.size != 1:
            raise NotImplementedError("tensor parallelism is not built yet")
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' ``t`` along the last dim (vocab-parallel logits)."""
        if self.size != 1:
            raise NotImplementedError("tensor parallelism is not built yet")
        return t

    def split(self, n: int, what: str) -> int:
        """This rank's share of ``n`` (heads, 4h features, vocab rows); refuses an uneven split."""
        if n % self.size:
            raise ValueError(f"bloom: {what} {n} is not divisible by the tensor-parallel size {self.size}")
        return n // self.size


# ------------------------------------------------------------------------------------------------
# ALiBi
# ------------------------------------------------------------------------------------------------
def alibi_slopes(n_head: int) -> torch.Tensor:
    """fp32 [n_head] slopes, computed as the reference does (torch.pow in fp32, so equal to the bit).

    For n a power of two: ``2^(-8/n * k)``, k = 1..n. Otherwise the series for the largest power
    of two p < n, then every other term (odd k) of the series for 2p, for the n - p remaining heads.
    Always on the CPU, whatever the default device (the model is built under ``torch.device("meta")``).
    """
    p = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(p) - 3))), dtype=torch.float32, device="cpu")
    slopes = torch.pow(base, torch.arange(1, 1 + p, dtype=torch.int32, device="cpu"))
    if p != n_head:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * p) - 3))), dtype=torch.float32, device="cpu")
        rest = min(p, n_head - p)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32, device="cpu"))])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """Megatron's tanh GELU, written term for term as BLOOM was trained (0.79788456 ~ sqrt(2/pi))."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Attention core shared by the dense (KServe) and the paged (generation) paths.

    q [X, Y, L, hd], k/v [X, Y, K, hd], alibi [X*Y, 1, K] and mask broadcastable to [X, Y, L, K]
    (additive, 0 or finfo.min) in the model dtype, where (X, Y) is (batch, heads) on the dense path
    and (heads, batch) on the paged one. Returns [X, Y, L, hd]. Same ops as the reference: ALiBi enters
    through baddbmm's ``input`` (so it is added in the model dtype before the mask), and the
    softmax runs in fp32 then casts back.
    """
    X, Y, L, hd = q.shape
    K = k.shape[2]
    scores = torch.baddbmm(alibi, q.reshape(X * Y, L, hd), k.reshape(X * Y, K, hd).transpose(1, 2),
                           beta=1.0, alpha=scale)  # [X*Y, L, K]
    probs = F.softmax(scores.view(X, Y, L, K) + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    ctx = torch.bmm(probs.view(X * Y, L, K), v.reshape(X * Y, K, hd))  # [X*Y, L, hd]
    return ctx.view(X, Y, L, hd)


# ------------------------------------------------------------------------------------------------
# How a forward gets its keys and values: the whole sequence (KServe) or the paged cache (step)
# ------------------------------------------------------------------------------------------------
class DenseAttention:
    """Keys = the batch's own tokens: x is [B, T, H]; left padding masked, ALiBi from the mask's cumsum."""

    def __init__(self, attention_mask: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> None:
        B, T = attention_mask.shape
        nh = slopes.shape[0]
        positions = (attention_mask.cumsum(-1) - 1) * attention_mask  # [B, T], 0 on padding
        self.alibi = (slopes[None, :, None] * positions[:, None, :]).reshape(B * nh, 1, T).to(dtype)
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]
        self.mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
        self.mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, T, nh, 3, hd] -> context [B, T, nh*hd]."""
        B, T, nh, _, hd = qkv.shape
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # 3 x [B, nh, T, hd]
        ctx = attend(q, k, v, self.alibi, self.mask, 1.0 / math.sqrt(hd))
        return ctx.permute(0, 2, 1, 3).reshape(B, T, nh * hd)


@dataclass
class SeqStep:
    """One sequence's share of a ``Bloom.step`` call (see the module docstring)."""

    new_tokens: list[int]  # the prompt (prefill), a suffix after preemption (recompute), or one token (decode)
    num_cached: int  # tokens of this sequence already in the cache (their K/V are in its blocks)
    block_table: list[int]  # block ids holding positions 0.. of this sequence; covers num_cached + len(new_tokens)


class KVCache:
    """Preallocated, bounded K/V storage in blocks of ``block_size`` tokens, as vLLM's paged cache.

    Two tensors, ``k`` and ``v``, each [n_layer, n_local_heads, num_blocks, block_size, head_dim]
    (``key(layer)`` / ``value(layer)``: [n_local_heads, num_blocks, block_size, head_dim]).

    Why heads first: a step gathers its sequences' blocks with one ``index_select`` on the block
    dim per layer, and the result [heads, B, blocks * block_size, head_dim] is already the
    contiguous [heads*B, positions, head_dim] operand of the attention ``bmm``; with tokens first
    ([num_blocks, block_size, heads, head_dim]) every gathered context needs a second, transposing
    copy (measured on bloom-560m's shapes, batch 8, 138 positions: 0.8 ms against 2.1 ms per layer).
    It also makes a tensor-parallel rank's cache simply its own heads.
    """

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_local_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVCache: num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_layer, self.n_local_heads, self.head_dim = n_layer, n_local_heads, head_dim
        shape = (n_layer, n_local_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused buffer for a step's gathered context (grown by 25% when too small, never shrunk).

        Why: on the CPU a fresh multi-MB tensor per layer is a fresh mmap whose pages fault in on
        first touch; at bloom-560m's batch 8 x 1024 positions that made each gather 5x slower
        (22 ms against 4 ms per layer). Costs at most two [heads, B x longest context, head_dim]
        buffers per cache.
        """
        n = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n + n // 4, dtype=self.k.dtype, device=self.k.device)
            self._scratch[name] = buf
        return buf[:n].view(shape)

    def key(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def value(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedAttention:
    """Keys = a sequence's cached positions plus its new tokens, read from (and written to) a ``KVCache``.

    x is the flat [N, H] of every sequence's new tokens back to back (no padding through the
    projections and the MLP, which are most of the work). Attention pads: queries to [B, L] (L the
    longest run of new tokens) and context to the first ``nblk`` blocks of each sequence (K = nblk *
    block_size positions for the longest context); positions past a sequence's end and padding
    rows are masked (padding rows compute garbage that is dropped). So that one long prefill does
    not pad every decode of the call to its length, decodes (one new token) and the rest attend
    as two separate groups. Attention runs with the batch in (head, sequence) order, the gathered
    cache's order.
    """

    def __init__(self, cache: KVCache, seqs: Sequence[SeqStep], slopes: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> None:
        bs = cache.block_size
        B = len(seqs)
        lens = [len(s.new_tokens) for s in seqs]
        cached = [s.num_cached for s in seqs]
        used = [-(-(c + n) // bs) for c, n in zip(cached, lens)]  # blocks each sequence spans
        table = torch.zeros(B, max(used), dtype=torch.long)
        for b, s in enumerate(seqs):
            table[b, :used[b]] = torch.tensor(s.block_table[:used[b]], dtype=torch.long)
        seq, i = _runs(lens)  # flat token n: sequence seq[n], its i[n]-th new token
        pos = torch.tensor(cached)[seq] + i
        self.write_slots = (table[seq, pos // bs] * bs + pos % bs).to(device)  # [N]
        starts = (torch.tensor(lens).cumsum(0) - torch.tensor(lens)).tolist()  # flat index of each first new token
        self.last = torch.tensor([st + n - 1 for st, n in zip(starts, lens)]).to(device)  # [B]
        self.N = int(seq.shape[0])
        decode = [b for b, n in enumerate(lens) if n == 1]
        other = [b for b, n in enumerate(lens) if n > 1]
        self.groups = [_Group([seqs[b] for b in g], [starts[b] for b in g], table[g, :max(used[b] for b in g)], bs,
                              slopes, dtype, device)
                       for g in (decode, other) if g]
        self.cache = cache

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [N, nh, 3, hd] -> context [N, nh*hd]; writes the new K/V into the cache first."""
        N, nh, _, hd = qkv.shape
        kc = self.cache.k[layer]  # [nh, num_blocks, bs, hd]
        vc = self.cache.v[layer]
        S = kc.shape[1] * kc.shape[2]
        kc.view(nh, S, hd)[:, self.write_slots] = qkv[:, :, 1].transpose(0, 1)  # [nh, N, hd] into its slots
        vc.view(nh, S, hd)[:, self.write_slots] = qkv[:, :, 2].transpose(0, 1)
        q_all = qkv[:, :, 0]  # [N, nh, hd]
        if len(self.groups) == 1 and self.groups[0].dense:
            return self.groups[0](q_all, kc, vc, self.cache)  # every sequence decodes, or all fit [B, L] exactly
        out = q_all.new_empty(N, nh * hd)
        for g in self.groups:
            out[g.out_index] = g(q_all, kc, vc, self.cache)
        return out


def _runs(lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of ``lens`` items laid back to back: each item's run and its index within the run."""
    lens_t = torch.tensor(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
    return seq, torch.arange(seq.shape[0]) - (lens_t.cumsum(0) - lens_t)[seq]


class _Group:
    """Attention inputs for sequences padded together: block gather index, query index, ALiBi, mask."""

    def __init__(self, seqs: Sequence[SeqStep], starts: Sequence[int], table: torch.Tensor, bs: int,
                 slopes: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        B, nblk = table.shape  # table [B, nblk]: block ids, 0 past a sequence's end (masked)
        lens = [len(s.new_tokens) for s in seqs]
        cached = [s.num_cached for s in seqs]
        L = max(lens)
        K = nblk * bs
        self.read_blocks = table.reshape(-1).to(device)  # [B*nblk]
        # padded row b*L + i <-> flat token starts[b] + i (padding rows read the group's first token)
        seq, i = _runs(lens)
        rows = seq * L + i
        flat = torch.tensor(starts)[seq] + i
        q_index = torch.full((B * L,), int(flat[0]), dtype=torch.long)
        q_index[rows] = flat
        self.q_index = q_index.to(device)
        self.rows = rows.to(device)  # the valid rows of the padded output
        self.out_index = flat.to(device)  # where they go in the flat output
        self.dense = rows.shape[0] == B * L and bool((flat == torch.arange(B * L)).all())  # padded order == flat
        self.B, self.L, self.K = B, L, K
        # ALiBi on the true key positions 0..K-1 (the same for every sequence) and the causal mask:
        # query row i of sequence b (absolute position cached_b + i) sees keys 0..cached_b + i.
        nh = slopes.shape[0]
        kpos = torch.arange(K)
        alibi = (slopes[:, None] * kpos[None, :]).to(dtype)  # [nh, K]
        self.alibi = alibi[:, None].expand(nh, B, K).reshape(nh * B, 1, K).to(device)
        qpos = torch.tensor(cached)[:, None] + torch.arange(L)[None, :]  # [B, L]
        allowed = kpos[None, None, :] <= qpos[:, :, None]  # [B, L, K]
        mask = torch.zeros(1, B, L, K, dtype=dtype)  # broadcast over the heads (leading dim)
        mask.masked_fill_(~allowed[None], torch.finfo(dtype).min)
        self.mask = mask.to(device)

    def __call__(self, q_all: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """q_all [N, nh, hd], the layer's cache [nh, num_blocks, bs, hd] -> context of the group's tokens [n, nh*hd]."""
        _, nh, hd = q_all.shape
        B, L, K = self.B, self.L, self.K
        gathered = (nh, self.read_blocks.shape[0], kc.shape[2], hd)  # [nh, B*nblk, bs, hd]: one gather each
        k = torch.index_select(kc, 1, self.read_blocks, out=cache.scratch("k", gathered)).view(nh, B, K, hd)
        v = torch.index_select(vc, 1, self.read_blocks, out=cache.scratch("v", gathered)).view(nh, B, K, hd)
        q = q_all[self.q_index].view(B, L, nh, hd).permute(2, 0, 1, 3)  # [nh, B, L, hd]
        ctx = attend(q, k, v, self.alibi, self.mask, 1.0 / math.sqrt(hd))  # [nh, B, L, hd]
        ctx = ctx.permute(1, 2, 0, 3).reshape(B * L, nh * hd)
        return ctx if self.dense else ctx[self.rows]


# ------------------------------------------------------------------------------------------------
# Modules (names = transformers' BloomForCausalLM)
# ------------------------------------------------------------------------------------------------
def row_parallel(x: torch.Tensor, layer: nn.Linear, parallel: Parallel) -> torch.Tensor:
    """A row-parallel linear: partial product, all-reduce, then the bias once (fused when size 1)."""
    if parallel.size == 1:
        return layer(x)
    return parallel.all_reduce(F.linear(x, layer.weight)) + layer.bias


class BloomAttention(nn.Module):
    """Fused qkv projection (column-parallel by heads) -> ALiBi attention -> ``dense`` (row-parallel)."""

    def __init__(self, cfg: BloomConfig, parallel: Parallel) -> None:
        super().__init__()
        self.parallel = parallel
        self.n_local_heads = parallel.split(cfg.n_head, "n_head")
        self.head_dim = cfg.head_dim
        local = self.n_local_heads * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * local)  # rows: [n_local_heads, 3, head_dim]
        self.dense = nn.Linear(local, cfg.hidden_size)

    def forward(self, x: torch.Tensor, layer: int, attn: DenseAttention | PagedAttention) -> torch.Tensor:
        qkv = self.query_key_value(x)  # [..., nh*3*hd]
        qkv = qkv.view(*x.shape[:-1], self.n_local_heads, 3, self.head_dim)  # [..., nh, 3, hd]
        return row_parallel(attn(layer, qkv), self.dense, self.parallel)  # [..., H]


class BloomMLP(nn.Module):
    """h -> 4h (column-parallel) -> tanh GELU -> h (row-parallel)."""

    def __init__(self, cfg: BloomConfig, parallel: Parallel) -> None:
        super().__init__()
        self.parallel = parallel
        inner = parallel.split(4 * cfg.hidden_size, "4 * hidden_size")
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_parallel(bloom_gelu(self.dense_h_to_4h(x)), self.dense_4h_to_h, self.parallel)


class BloomBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then + mlp(LN(.)); the residual may be the LN output (config flag)."""

    def __init__(self, cfg: BloomConfig, parallel: Parallel) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.self_attention = BloomAttention(cfg, parallel)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = BloomMLP(cfg, parallel)
        self.post_ln_residual = cfg.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, layer: int, attn: DenseAttention | PagedAttention) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.post_ln_residual else x) + self.self_attention(h, layer, attn)
        h = self.post_attention_layernorm(x)
        return (h if self.post_ln_residual else x) + self.mlp(h)


class BloomModel(nn.Module):
    """Embeddings (+ their LayerNorm), the blocks, the final LayerNorm: ids -> hidden states."""

    def __init__(self, cfg: BloomConfig, parallel: Parallel) -> None:
        super().__init__()
        if parallel.size != 1:  # vocab-parallel lookup: mask ids outside the rank's range, all-reduce
            raise NotImplementedError("tensor parallelism is not built yet")
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(cfg, parallel) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(self, ids: torch.Tensor, attn: DenseAttention | PagedAttention) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(ids))  # [..., H]
        for i, block in enumerate(self.h):
            x = block(x, i, attn)
        return self.ln_f(x)


class BloomForCausalLM(nn.Module):
    """``transformer`` + ``lm_head`` (tied to the word embeddings unless the folder has its own)."""

    def __init__(self, cfg: BloomConfig, parallel: Parallel | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.parallel = parallel or Parallel()
        self.transformer = BloomModel(cfg, self.parallel)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A plain attribute, not a buffer: the module is built on meta and buffers would need a state entry.
        n_local = self.parallel.split(cfg.n_head, "n_head")
        self.slopes = alibi_slopes(cfg.n_head)[self.parallel.rank * n_local:(self.parallel.rank + 1) * n_local]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_last(self.lm_head(h))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids (+ 0/1 mask, left padding) -> [B, T, vocab] logits in the model dtype."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attn = DenseAttention(attention_mask, self.slopes.to(input_ids.device), self.lm_head.weight.dtype)
        return self.logits(self.transformer(input_ids, attn))


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def hub_state(state: Mapping[str, torch.Tensor], cfg: BloomConfig) -> dict[str, torch.Tensor]:
    """Names of a Hub file -> names of ``BloomForCausalLM``.

    ``BloomModel`` saves (and early bigscience files) have no ``transformer.`` prefix; a tied head
    is absent and becomes the embedding tensor itself (no copy). With ``tie_word_embeddings`` true
    a stored ``lm_head.weight`` is ignored, as transformers ties it over the loaded value.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        out[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k] = v
    emb = out.get("transformer.word_embeddings.weight")
    if emb is not None and (cfg.tie_word_embeddings or "lm_head.weight" not in out):
        out["lm_head.weight"] = emb
    return out


def load_bloom(folder: Path, cfg: BloomConfig, device: torch.device) -> BloomForCausalLM:
    """Build on meta and assign the folder's (memory-mapped) tensors; converts only when the dtype differs."""
    state = hub_state(read_state_dict(folder), cfg)
    converted: dict[int, torch.Tensor] = {}  # id -> converted: a tied head stays tied through a dtype change
    for k, v in state.items():
        if v.dtype != cfg.dtype:
            state[k] = converted.setdefault(id(v), v.to(cfg.dtype))
    net = build_on_meta(lambda: BloomForCausalLM(cfg))
    load_into(net, state, device)
    if cfg.tie_word_embeddings or state["lm_head.weight"] is state["transformer.word_embeddings.weight"]:
        net.lm_head.weight = net.transformer.word_embeddings.weight
    net.slopes = net.slopes.to(device)
    return net


# ------------------------------------------------------------------------------------------------
# Servable model
# ------------------------------------------------------------------------------------------------
class Bloom(Model):
    """BLOOM as KServe ``input_ids`` -> ``logits`` and as the engine of the generation scheduler (``step``)."""

    model_type = "bloom"

    @classmethod
    def convert(cls, src: Path, out: Path, args: argparse.Namespace) -> Path:
        return convert_bloom(src, out, args)

    @classmethod
    def add_convert_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device, cfg: BloomConfig,
                 net: BloomForCausalLM, tokenizer: Tokenizer | None) -> None:
        super().__init__(folder, config, device)
        self.cfg = cfg
        self.net = net
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.max_model_len = cfg.max_model_len
        self.dtype = cfg.dtype
        self.slopes_cpu = net.slopes.cpu()  # step builds its index tensors on the CPU, then moves them once
        eos = cfg.eos_token_id if "eos_token_id" in config else None
        self.eos_token_id: int | None = eos if eos is not None else (tokenizer.eos_token_id if tokenizer else cfg.eos_token_id)
        self.inputs = (
            TensorSpec("input_ids", "INT64", (-1, -1)),
            TensorSpec("attention_mask", "INT64", (-1, -1), optional=True),
        )
        self.outputs = (TensorSpec("logits", "FP32", (-1, -1, cfg.vocab_size)),)

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device,
              dtype: str | torch.dtype | None = None) -> Bloom:
        from models.text import Tokenizer

        cfg = BloomConfig.from_dict(config, dtype, device)
        net = load_bloom(Path(folder), cfg, torch.device(device))
        tokenizer = Tokenizer.from_folder(folder)
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
        return cls(Path(folder), config, torch.device(device), cfg, net, tokenizer)

    # -- KServe ---------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)  # names, INT64, rank 2
        ids = inputs["input_ids"]
        N, T = ids.shape
        if T < 1:
            raise InputError("input 'input_ids' has no tokens (shape [N, 0])")
        if T > self.max_model_len:
            raise InputError(f"input 'input_ids' has {T} tokens; this model's context is {self.max_model_len}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(f"input 'input_ids' holds token id {lo if lo < 0 else hi}, outside [0, {self.vocab_size})")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = np.ones_like(ids)
        else:
            if mask.shape != ids.shape:
                raise InputError(f"input 'attention_mask' has shape {list(mask.shape)}; 'input_ids' has {list(ids.shape)}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("input 'attention_mask' must hold only 0 and 1")
            if not mask.any(axis=1).all():
                raise InputError("input 'attention_mask' has a row with no token (all zeros)")
        return {"input_ids": torch.from_numpy(np.array(ids, dtype=np.int64, order="C")),
                "attention_mask": torch.from_numpy(np.array(mask, dtype=np.int64, order="C"))}

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            return {"logits": self.net(ids, mask).float().cpu()}

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        rng = np.random.default_rng(0)
        high = self.tokenizer.vocab_size if self.tokenizer is not None else self.vocab_size
        return {"input_ids": rng.integers(0, high, size=(batch_size, 8), dtype=np.int64)}

    def warmup(self) -> None:
        super().warmup()
        cache = self.allocate_kv_cache(2, 8)
        self.step(cache, [SeqStep([0, 1, 2], 0, [0]), SeqStep([3], 4, [1])])

    # -- generation -----------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take in the cache, all layers (this rank's heads)."""
        attn = self.net.transformer.h[0].self_attention
        return self.cfg.n_layer * 2 * attn.n_local_heads * attn.head_dim * torch.finfo(self.dtype).bits // 8

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        attn = self.net.transformer.h[0].self_attention
        return KVCache(self.cfg.n_layer, num_blocks, block_size, attn.n_local_heads, attn.head_dim,
                       self.dtype, self.device)

    def check_step(self, cache: KVCache, seqs: Sequence[SeqStep]) -> None:
        """ValueError for a malformed call (a scheduler bug); InputError for a bad token or too long a context."""
        if not seqs:
            raise ValueError("step: no sequences")
        for n, s in enumerate(seqs):
            if not s.new_tokens:
                raise ValueError(f"step: sequence {n} has no new tokens")
            if s.num_cached < 0:
                raise ValueError(f"step: sequence {n} has num_cached {s.num_cached} < 0")
            total = s.num_cached + len(s.new_tokens)
            if total > self.max_model_len:
                raise InputError(f"sequence of {total} tokens exceeds this model's context of {self.max_model_len}")
            need = -(-total // cache.block_size)
            if len(s.block_table) < need:
                raise ValueError(f"step: sequence {n} needs {need} blocks for {total} tokens, its table has {len(s.block_table)}")
            bad = [b for b in s.block_table[:need] if not 0 <= b < cache.num_blocks]
            if bad:
                raise ValueError(f"step: sequence {n} names block {bad[0]}, outside the cache's {cache.num_blocks}")

    @torch.inference_mode()
    def step(self, cache: KVCache, seqs: list[SeqStep]) -> torch.Tensor:
        """Run new tokens of several sequences in one forward; return fp32 logits [len(seqs), vocab] of each sequence's LAST new token."""
        self.check_step(cache, seqs)
        ids = torch.tensor([t for s in seqs for t in s.new_tokens], dtype=torch.long)  # [N]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
        attn = PagedAttention(cache, seqs, self.slopes_cpu, self.dtype, self.device)
        tr = self.net.transformer
        x = tr.word_embeddings_layernorm(tr.word_embeddings(ids.to(self.device)))  # [N, H]
        for i, block in enumerate(tr.h):
            x = block(x, i, attn)
        h = tr.ln_f(x[attn.last])  # [B, H]: only the last new token of each sequence needs logits
        return self.net.logits(h).float()  # [B, vocab]


# ------------------------------------------------------------------------------------------------
# Random model folder (tests, demo): tiny BLOOM + a byte-level BPE tokenizer trained here
# ------------------------------------------------------------------------------------------------
SMALL_CONFIG: dict[str, Any] = {"hidden_size": 64, "n_head": 4, "n_layer": 2, "seq_length": 256}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the demo tokenizer: a little of several scripts, so merges and multi-byte
# characters (accents, CJK, emoji) all occur.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A server answers requests; a model turns tokens into text.
Once upon a time there was a small language model that lived in a test folder and dreamed of being served.
It learned the words the, and, of, to, in, is, that, it, was, for, on, are, with, as, his, they, be, at, one.
Large language models predict the next token. Tokens are pieces of words; bytes are pieces of tokens.
<|user|> Hello! How are you today? <|assistant|> I am fine, thank you. What can I do for you?
<|system|> You are a helpful assistant. Answer briefly and politely.
Français : café, crème brûlée, garçon, où est la gare ? Déjà vu, naïve, élève, Noël.
Español: el niño comió piñata; mañana será otro día. Deutsch: Grüße aus München, schön, Straße.
中文：你好，世界。今天天气很好。我们一起学习语言模型。日本語：こんにちは、世界。ありがとう。
한국어: 안녕하세요. Русский: Привет, мир! Ελληνικά: Γειά σου κόσμε. العربية: مرحبا بالعالم.
Emoji: 😀 😃 😄 🚀 🌍 👍🏽 ❤️ 🎉 — and math: α + β = γ, ∑ x², √2 ≈ 1.414, 3 × 4 = 12.
def step(cache, seqs): return logits  # code also appears in text, with {braces} and [brackets].
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2048 250880, dates 2024-01-01, times 12:34:56.
"""


def build_tokenizer(corpus: str = CORPUS, vocab_size: int = 400):
    """A byte-level BPE trained on ``corpus`` with BLOOM's special tokens at BLOOM's ids (0-3)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def random_bloom_folder(out: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write a deterministic random BLOOM folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) that both this module and transformers load; ``config`` overrides the
    tiny default. The vocabulary is padded above the tokenizer's, as BLOOM's is.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    padded = (n_tok // 64 + 1) * 64  # strictly above: some logits belong to no token
    base = {"vocab_size": padded, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **SMALL_CONFIG}
    cfg = BloomConfig.from_dict({**base, **(config or {})})
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "padding_side": "left",
        "model_max_length": cfg.max_model_len, "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n")

    gen = torch.Generator().manual_seed(seed)
    net = build_on_meta(lambda: BloomForCausalLM(cfg))
    state: dict[str, torch.Tensor] = {}
    for name, p in sorted(net.state_dict(keep_vars=True).items()):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: saved once, as transformers does
        if "layernorm" in name or "ln_f" in name:  # near 1 / near 0, random so a swapped LN shows
            t = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.05 * torch.randn(p.shape, generator=gen)
        elif "word_embeddings" in name or name == "lm_head.weight":
            t = 0.5 * torch.randn(p.shape, generator=gen)
        else:
            t = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        state[name] = t.to(cfg.dtype)
    return write_model_folder(out, cfg.to_json(), state)


# ------------------------------------------------------------------------------------------------
# Converter: transformers' pickled pytorch_model.bin (one file or shards) -> model folder
# ------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "bloom", "SRC is a Hub folder (config.json + pytorch_model.bin, or its shards and "
        "pytorch_model.bin.index.json) or a .bin file with config.json beside it. Tokenizer files are copied.")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="store the weights in this dtype")


def read_pickled_bloom(src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(folder, tensors) of a pickled transformers checkpoint: one ``.bin`` or the shards its index names."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        index = src / "pytorch_model.bin.index.json"
        if (src / "pytorch_model.bin").is_file():
            files = [src / "pytorch_model.bin"]
        elif index.is_file():
            files = [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            raise FileNotFoundError(f"{src}: no pytorch_model.bin or pytorch_model.bin.index.json")
    else:
        files = [src]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(plain_state_dict(torch_load_tensors(f)))
    return folder, state


def convert_bloom(src: Path, out: Path, args: argparse.Namespace | None = None) -> Path:
    """transformers ``BloomForCausalLM``/``BloomModel`` pickles -> config.json + model.safetensors (+ tokenizer)."""
    folder, state = read_pickled_bloom(Path(src))
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (BLOOM's head count cannot be read from the tensor shapes)")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type", "bloom") != "bloom":
        raise ValueError(f"{cfg_path}: model_type {config.get('model_type')!r} is not bloom")
    dtype = getattr(args, "dtype", None)
    cfg = BloomConfig.from_dict(config, dtype or "float32")
    state = hub_state(state, cfg)
    tied = state["lm_head.weight"] is state.get("transformer.word_embeddings.weight")
    check_state(lambda: BloomForCausalLM(cfg), state, f"the BLOOM of {cfg_path}")  # names and shapes, exactly
    if tied:
        del state["lm_head.weight"]
    if dtype:
        state = {k: v.to(cfg.dtype) for k, v in state.items()}
        config["torch_dtype"] = dtype
        config.pop("dtype", None)
    config["model_type"] = "bloom"
    config.setdefault("tie_word_embeddings", tied)
    write_model_folder(out, config, state)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, Path(out) / name)
    return Path(out)

