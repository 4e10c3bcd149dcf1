"""Choosing the next token: ``SamplingParams`` (validated request options) and a batched ``sample``.

Processing order is transformers' ``generate``: the repetition penalty (over prompt + generated
ids, ``RepetitionPenaltyLogitsProcessor``), then temperature, top-k, top-p; then argmax
(temperature 0 or None: greedy) or a draw from the softmax.

Reproducibility: a request with a ``seed`` draws from its own ``torch.Generator`` (``generator_for``),
so the same seed gives the same tokens whatever else shares the batch; the rows of a batch are
processed independently (row-wise kernels, per-row draws). For one sequence, ``seed=s`` draws
exactly what transformers' ``generate(do_sample=True)`` draws after ``torch.manual_seed(s)``
(tested token for token with penalty, temperature, top-k and top-p).

Log-probabilities: the reported value is ``log_softmax`` of the model's RAW logits at the chosen
token (before penalty, temperature, top-k/p), as vLLM reports by default: it measures how likely
the model found the token, not how the sampler was shaped.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.spec import InputError

__all__ = ["MAX_LOGPROBS", "MAX_STOP", "SamplingParams", "generator_for", "sample", "top_logprobs"]

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; a few more cost nothing)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """Per-request generation options; ``__post_init__`` validates and normalizes (``InputError``).

    temperature: 0 or None = greedy; top_k: None, 0 or -1 = off; top_p: 1.0 = off;
    repetition_penalty: 1.0 = off (HF semantics: positive logits divided, negative multiplied);
    max_tokens: None = until EOS or the context ends; stop: strings ending the output (excluded from
    it); logprobs: False / True (the chosen token's) / an int n in 0..20 (also the n most likely).
    """

    temperature: float | None = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool | int = False

    def __post_init__(self) -> None:
        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"{name} must be an integer, got {value!r}")
            return int(value)

        if self.temperature is not None:
            self.temperature = number("temperature", self.temperature)
            if self.temperature < 0:
                raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            self.top_k = integer("top_k", self.top_k)
            if self.top_k < -1:
                raise InputError(f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}")
            if self.top_k in (0, -1):
                self.top_k = None
        self.top_p = number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self.seed = integer("seed", self.seed)
            if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
                raise InputError(f"seed must fit in 64 bits, got {self.seed}")
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_tokens is not None:
            self.max_tokens = integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise InputError("stop strings must not be empty")
        if len(self.stop) > MAX_STOP:
            raise InputError(f"at most {MAX_STOP} stop strings, got {len(self.stop)}")
        self.stop = list(self.stop)
        if not isinstance(self.logprobs, bool):
            n = integer("logprobs", self.logprobs)
            if not 0 <= n <= MAX_LOGPROBS:
                raise InputError(f"logprobs must be a boolean or an integer in 0..{MAX_LOGPROBS}, got {n}")
            self.logprobs = n

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature == 0.0

    @property
    def num_top_logprobs(self) -> int:
        """How many alternatives to report besides the chosen token (0 for False/True)."""
        return 0 if isinstance(self.logprobs, bool) else self.logprobs


def generator_for(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded by ``params.seed`` (create one per sequence and keep it for its whole life)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def apply_repetition_penalty(logits: torch.Tensor, params: Sequence[SamplingParams],
                             previous: Sequence[Sequence[int]]) -> torch.Tensor:
    """HF's processor, vectorized over the rows whose penalty is not 1 (in place on a copy)."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and len(previous[i]) > 0]
    if not rows:
        return logits
    logits = logits.clone()
    width = max(len(previous[i]) for i in rows)
    V = logits.shape[1]
    # pad each row's ids by repeating its first id (a repeated index gathers and scatters the same value);
    # ids past the logits (none for a model's own tokens) are dropped as HF drops them
    ids = torch.tensor([list(previous[i]) + [previous[i][0]] * (width - len(previous[i])) for i in rows],
                       dtype=torch.long, device=logits.device)
    ids = ids.clamp(max=V)
    penalty = torch.tensor([params[i].repetition_penalty for i in rows], dtype=logits.dtype,
                           device=logits.device)[:, None]
    sub = F_pad(logits[rows])  # [r, V+1]
    score = sub.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    sub = sub.scatter(1, ids, score)
    logits[rows] = sub[:, :V]
    return logits


def F_pad(x: torch.Tensor) -> torch.Tensor:
    """One extra column that absorbs out-of-vocabulary ids."""
    return torch.nn.functional.pad(x, (0, 1))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], previous: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None] | None = None) -> tuple[list[int], list[float]]:
    """Pick one token per row of ``logits`` [n, V] (fp32).

    ``previous[i]``: row i's prompt + generated ids (for the repetition penalty); ``generators[i]``:
    its seeded generator or None (torch's global generator). Returns (token ids, log-probabilities
    of those tokens under the raw logits).
    """
    n, V = logits.shape
    if len(params) != n or len(previous) != n:
        raise ValueError(f"sample: {n} rows of logits but {len(params)} params and {len(previous)} histories")
    generators = list(generators) if generators is not None else [None] * n
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    scores = apply_repetition_penalty(logits, params, previous)
    chosen = torch.empty(n, dtype=torch.long, device=logits.device)

    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        chosen[greedy] = scores[greedy].argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        s = scores[sampled]  # [m, V]
        temps = torch.tensor([params[i].temperature for i in sampled], dtype=s.dtype, device=s.device)[:, None]
        if bool((temps != 1.0).any()):
            s = s / temps
        ks = [params[i].top_k for i in sampled]
        if any(k is not None for k in ks):
            k = torch.tensor([min(k, V) if k is not None else V for k in ks], device=s.device)[:, None]
            kth = s.topk(int(k.max()), dim=-1).values.gather(1, k - 1)  # [m, 1]: the k-th largest per row
            s = s.masked_fill(s < kth, float("-inf"))  # ties with the k-th are kept, as in HF
        top_ps = [params[i].top_p for i in sampled]
        if any(p < 1.0 for p in top_ps):
            sorted_s, order = torch.sort(s, descending=False)
            cum = sorted_s.softmax(dim=-1).cumsum(dim=-1)
            # 1 - top_p in double, then fp32, as HF compares with a Python float; rows with top_p 1 remove nothing
            floor = torch.tensor([1 - p if p < 1.0 else -1.0 for p in top_ps], dtype=s.dtype, device=s.device)[:, None]
            remove_sorted = cum <= floor
            remove_sorted[:, -1] = False  # keep at least one token
            s = s.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
        probs = torch.softmax(s, dim=-1)
        for j, i in enumerate(sampled):
            chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0]
    return chosen.tolist(), logprobs.tolist()


def top_logprobs(logits: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The ``n`` most likely (token, log-probability) of each row of raw ``logits`` [rows, V]."""
    if n <= 0:
        return [[] for _ in range(logits.shape[0])]
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(n, dim=-1)
    return [list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids.tolist(), values.tolist())]
