"""Text generation with continuous batching over a paged KV cache (one engine per BLOOM model per worker).

The tensor work is the model's (``models.bloom``: ``allocate_kv_cache``, ``step``); this module
is the scheduling around it, as vLLM's: a preallocated pool of KV blocks and a block allocator,
per-sequence block tables, a bounded waiting queue, and a loop that runs every running sequence
in one ``model.step`` per iteration on the worker's inference thread (``batcher.Device``, shared
with the KServe batchers of the same worker).

* **Admission**: a request is validated and tokenized on arrival (a prompt longer than the
  context or the pool is a 400 naming both limits), then waits in a FIFO queue of at most
  ``max_queue_size`` (beyond: 503). Before each step, waiting sequences join while fewer than
  ``max_num_seqs`` run and the pool has blocks for their prompt (plus a small watermark while
  others run, so that joining does not immediately force a preemption).
* **Steps**: every running sequence feeds its uncached tokens (a whole prompt on its first step,
  one token afterwards) and gets one new token. Prefills join the decodes of the other sequences
  in the same step (``PREFILL_POLICY``). Measured (``bench/prefill_policy.py``: 8 running
  generations of 64 tokens, a random BLOOM of hidden 256 x 4 layers, one CPU thread, medians
  of 5 rounds): with 16 prompts of 128 tokens arriving 10 ms apart, mixing took 1.2 s against
  1.7 s for a prefill step of its own, time to first token 59 against 179 ms, time per output
  token of the running ones 17.4 against 22.1 ms; with 8 prompts of 64 tokens 50 ms apart the
  two are even (0.8 / 0.9 s; a separate step gave a 18 ms first token against 28 ms, at the cost
  of the others' decodes). One step of 8 decodes + a 64-token prefill takes 11 ms, the two
  apart 5.7 + 7.9 ms. So mixed it is.
* **Leaving**: a sequence that finishes (EOS, a stop string, max_tokens, the context), is
  cancelled (client gone, ZeroMQ ``cancel``) or fails leaves at the end of the step it is in, and
  its blocks go back to the pool at once.
* **Preemption**: when a running sequence needs a new block and none is free, the newest running
  sequence is preempted: its blocks are freed and it goes back to the head of the queue; when it
  is admitted again its prompt and generated tokens are recomputed in one prefill (vLLM's
  recompute mode). Greedy output is unchanged by it; seeded sampling too (each sequence keeps its
  own generator, and recomputing draws nothing).

Output: each sequence has a queue of chunks (``dict``, msgpack-able, the same on the peer wire):
``{"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}``, plus, when
logprobs are asked for, ``"logprobs"`` (of the chosen tokens), ``"tokens"`` (their text) and
``"top_logprobs"`` (per token, ``[[id, logprob, text], ...]``, most likely first); the last one has a ``finish_reason`` (``"stop"``: EOS or a stop string,
``"length"``: max_tokens or the context/pool limit).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from models.sampling import SamplingParams, generator_for, sample, top_logprobs
from models.spec import InputError
from server import metrics
from server.config import ModelConf
from server.errors import BadRequest, Overloaded
from server.logs import log
from server.serving.batcher import Device

BLOCK_SIZE = 16  # tokens per KV block (vLLM's default on GPU)
DEFAULT_KV_BYTES = 512 << 20  # pool size without a kv_cache_tokens / kv_cache_size directive
PREFILL_POLICY = "mixed"  # "mixed": a new prompt runs in the same step as the others' decodes; "separate": its own step
REQUEST_KEYS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                "stop", "logprobs", "ignore_eos", "skip_special_tokens"}


class BlockAllocator:
    """A free list over ``num_blocks`` block ids; a sequence's blocks are its block table."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def free(self) -> int:
        return len(self.free_ids)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise MemoryError(f"{n} blocks asked, {len(self.free_ids)} free")
        got = self.free_ids[-n:] if n else []
        del self.free_ids[len(self.free_ids) - n:]
        return got[::-1]

    def release(self, blocks: list[int]) -> None:
        self.free_ids.extend(reversed(blocks))


class Sequence:
    """One request's state: its tokens, what of them is cached, its blocks, its output queue."""

    def __init__(self, sid: int, prompt: list[int], params: SamplingParams, limit: int, stream: Any,
                 ignore_eos: bool, device: Any = "cpu") -> None:
        self.sid = sid
        self.tokens = list(prompt)  # prompt + generated; tokens[:num_cached] have their K/V in the blocks
        self.prompt_len = len(prompt)
        self.params = params
        self.limit = limit  # the most tokens (prompt + generated) it may reach: context, pool, max_tokens
        self.text = stream  # models.text.TextStream, or None without a tokenizer
        self.ignore_eos = ignore_eos
        self.generator = generator_for(params, device)  # on the logits' device: sampling draws there
        self.num_cached = 0
        self.table: list[int] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.preempted = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def blocks_needed(self, block_size: int) -> int:
        return -(-len(self.tokens) // block_size)


class GenerationStream:
    """What a front door iterates: the chunks of one sequence. Closing it early cancels the sequence."""

    def __init__(self, engine: GenerationEngine, seq: Sequence) -> None:
        self.engine, self.seq = engine, seq
        self.prompt_tokens = seq.prompt_len
        self.done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.seq.queue.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.get("finish_reason") is not None:
            self.done = True
        return item

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.engine.cancel(self.seq)

    async def aclose(self) -> None:
        self.cancel()


class GenerationEngine:
    """Continuous batching for one generative model in one worker."""

    def __init__(self, name: str, model: Any, conf: ModelConf, device: Device, worker: str = "") -> None:
        self.name, self.model, self.conf, self.device, self.worker = name, model, conf, device, worker
        per_token = model.kv_bytes_per_token()
        if conf.kv_cache_tokens is not None:
            tokens = conf.kv_cache_tokens
        elif conf.kv_cache_size is not None:
            tokens = conf.kv_cache_size // per_token
        else:  # 512 MiB, or less when max_num_seqs full-length sequences need less
            tokens = min(DEFAULT_KV_BYTES // per_token, conf.max_num_seqs * model.max_model_len)
        self.block_size = BLOCK_SIZE
        num_blocks = tokens // self.block_size
        if num_blocks < 1:
            raise ValueError(f'model "{name}": the KV cache holds {tokens} tokens, less than one block of {BLOCK_SIZE}')
        self.cache = model.allocate_kv_cache(num_blocks, self.block_size)
        self.blocks = BlockAllocator(num_blocks)
        self.pool_tokens = num_blocks * self.block_size
        self.context = min(model.max_model_len, self.pool_tokens)  # the most tokens one sequence may hold
        self.max_num_seqs = conf.max_num_seqs
        self.watermark = max(1, num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ids = itertools.count()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.tokenizer = model.tokenizer
        self.eos = model.eos_token_id
        self.prefill_policy = PREFILL_POLICY
        # counters for tests and operators (the metrics carry the same)
        self.stats = {"steps": 0, "preemptions": 0, "cancelled": 0, "finished": 0, "admitted": 0}
        self.m_running = metrics.GEN_RUNNING.labels(name)
        self.m_waiting = metrics.GEN_WAITING.labels(name)
        self.m_kv = metrics.KV_USAGE.labels(name)
        self.m_ttft = metrics.TTFT_SECONDS.labels(name)
        self.m_tpot = metrics.TPOT_SECONDS.labels(name)
        self.m_prompt = metrics.PROMPT_TOKENS.labels(name)
        self.m_generated = metrics.GENERATED_TOKENS.labels(name)
        self.m_preempt = metrics.PREEMPTIONS.labels(name)
        log.info('model "%s": KV cache of %d blocks x %d tokens (%.1f MiB), context %d, max_num_seqs %d',
                 name, num_blocks, self.block_size, self.cache.nbytes / 2**20, self.context, self.max_num_seqs)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"generation:{self.name}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)

    def info(self) -> dict[str, Any]:
        """What peers and /v1/models learn about this model."""
        return {"max_model_len": self.model.max_model_len, "context": self.context,
                "chat_template": bool(self.tokenizer is not None and self.tokenizer.chat_template),
                "tokenizer": self.tokenizer is not None}

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Mapping[str, Any]) -> GenerationStream:
        """Validate, tokenize and queue one request (raises BadRequest/InputError 400, Overloaded 503)."""
        if not isinstance(request, Mapping):
            raise BadRequest("a generation request must be a map")
        unknown = set(request) - REQUEST_KEYS
        if unknown:
            raise BadRequest(f"unknown generation option(s) {sorted(unknown)} (known: {sorted(REQUEST_KEYS)})")
        prompt = self._prompt(request)
        params = SamplingParams(
            temperature=request.get("temperature", 1.0), top_k=request.get("top_k"),
            top_p=1.0 if request.get("top_p") is None else request["top_p"], seed=request.get("seed"),
            repetition_penalty=1.0 if request.get("repetition_penalty") is None else request["repetition_penalty"],
            max_tokens=request.get("max_tokens"), stop=request.get("stop") or [],
            logprobs=False if request.get("logprobs") is None else request["logprobs"])
        if params.stop and self.tokenizer is None:
            raise BadRequest(f"model {self.name!r} has no tokenizer: stop strings cannot be matched")
        n = len(prompt)
        if n > self.context - 1:
            raise BadRequest(
                f"the prompt has {n} tokens; model {self.name!r} holds at most {self.context} tokens per sequence "
                f"(context {self.model.max_model_len}, KV cache {self.pool_tokens} tokens), prompt and output together, "
                f"so the prompt may have at most {self.context - 1}")
        limit = self.context
        if params.max_tokens is not None:
            if n + params.max_tokens > self.context:
                raise BadRequest(
                    f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds the "
                    f"{self.context} tokens model {self.name!r} holds per sequence (context {self.model.max_model_len}, "
                    f"KV cache {self.pool_tokens} tokens)")
            limit = n + params.max_tokens
        if len(self.waiting) >= self.conf.max_queue_size:
            raise Overloaded(f"model {self.name!r}: queue full ({self.conf.max_queue_size} sequences waiting)")
        stream = None
        if self.tokenizer is not None:
            from models.text import TextStream

            skip = request.get("skip_special_tokens", True)
            stream = TextStream(self.tokenizer, params.stop, skip_special_tokens=bool(skip))
        seq = Sequence(next(self.ids), prompt, params, limit, stream, bool(request.get("ignore_eos", False)),
                       getattr(self.model, "device", "cpu"))
        self.waiting.append(seq)
        self.m_prompt.inc(n)
        self._gauges()
        self.wakeup.set()
        return GenerationStream(self, seq)

    def _prompt(self, request: Mapping[str, Any]) -> list[int]:
        if "messages" in request:
            if "prompt" in request:
                raise BadRequest("give either 'prompt' or 'messages', not both")
            if self.tokenizer is None or not self.tokenizer.chat_template:
                raise BadRequest(f"model {self.name!r} has no chat template (its tokenizer files define none): "
                                 "use /v1/completions with a prompt instead")
            messages = request["messages"]
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise BadRequest("'messages' must be a non-empty list of objects")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            prompt = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            p = request.get("prompt")
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise BadRequest(f"model {self.name!r} has no tokenizer: give the prompt as token ids")
                prompt = self.tokenizer.encode(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                prompt = list(p)
                bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
                if bad:
                    raise BadRequest(f"prompt token id {bad[0]} is outside [0, {self.model.vocab_size})")
            else:
                raise BadRequest("'prompt' must be a string or a list of token ids")
        if not prompt:
            raise BadRequest("the prompt is empty (no tokens)")
        return prompt

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves at the next step boundary and frees its blocks."""
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        self.stats["cancelled"] += 1
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.finished = True
            self._gauges()
        self.wakeup.set()

    # -- the loop --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._reap()
            if not self.running and not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = self._schedule()
            if not batch:
                await asyncio.sleep(0)
                continue
            steps = [(s.tokens[s.num_cached:], s.num_cached, list(s.table)) for s in batch]
            self.stats["steps"] += 1
            try:
                result = await self.device.run(self._step, batch, steps)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status = 400 if isinstance(exc, InputError) else 500
                if status == 500:
                    log.error('model "%s": generation step failed', self.name, exc_info=exc)
                for seq in batch:
                    self._finish(seq, None, exc if status == 400 else RuntimeError("generation failed (logged by the server)"))
                continue
            self._apply(batch, steps, result)

    def _reap(self) -> None:
        """Cancelled and finished sequences leave the running set; their blocks return to the pool."""
        keep = []
        for seq in self.running:
            if seq.cancelled or seq.finished:
                self._release(seq)
                seq.finished = True
            else:
                keep.append(seq)
        if len(keep) != len(self.running):
            self.running = keep
            self._gauges()

    def _release(self, seq: Sequence) -> None:
        if seq.table:
            self.blocks.release(seq.table)
            seq.table = []
        seq.num_cached = 0

    def _schedule(self) -> list[Sequence]:
        """Admit waiting sequences, give running ones the blocks they grow into (preempting if needed)."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = seq.blocks_needed(self.block_size)
            reserve = self.watermark if self.running else 0
            if self.blocks.free - need < reserve:
                break
            self.waiting.popleft()
            seq.table = self.blocks.allocate(need)
            seq.num_cached = 0
            self.running.append(seq)
            admitted.append(seq)
            self.stats["admitted"] += 1
        # growth: a decode whose next token starts a new block
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below for an older one
            while seq.blocks_needed(self.block_size) > len(seq.table):
                if self.blocks.free:
                    seq.table += self.blocks.allocate(1)
                    continue
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                if victim is seq:
                    break
        self._gauges()
        if admitted and self.prefill_policy == "separate":
            return [s for s in admitted if s in self.running]
        return list(self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preempted += 1
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1
        self.m_preempt.inc()
        log.debug('model "%s": preempted sequence %d (%d tokens) for lack of KV blocks', self.name, seq.sid, len(seq.tokens))

    def _step(self, batch: list[Sequence], steps: list[tuple[list[int], int, list[int]]]):
        """On the inference thread: one forward over every sequence of the batch, then sampling."""
        from models.bloom import SeqStep

        logits = self.model.step(self.cache, [SeqStep(t, c, b) for t, c, b in steps])
        params = [s.params for s in batch]
        chosen, logprobs = sample(logits, params, [s.tokens for s in batch], [s.generator for s in batch])
        n_top = max(p.num_top_logprobs for p in params)
        tops = top_logprobs(logits, n_top) if n_top else None
        return chosen, logprobs, tops

    def _apply(self, batch: list[Sequence], steps, result) -> None:
        chosen, logprobs, tops = result
        now = time.perf_counter()
        self.m_generated.inc(len(batch))
        for i, seq in enumerate(batch):
            seq.num_cached += len(steps[i][0])
            if seq.finished or seq.cancelled:
                continue
            token = chosen[i]
            seq.tokens.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.m_ttft.observe(now - seq.arrival)
            chunk: dict[str, Any] = {"text": "", "token_ids": [token]}
            if seq.params.logprobs is not False:
                chunk["logprobs"] = [logprobs[i]]
                chunk["tokens"] = [self._piece(token)]
                if seq.params.num_top_logprobs and tops is not None:
                    chunk["top_logprobs"] = [[[t, lp, self._piece(t)] for t, lp in tops[i][:seq.params.num_top_logprobs]]]
            reason = None
            is_eos = token == self.eos and not seq.ignore_eos
            if seq.text is not None and not is_eos:
                delta, stopped = seq.text.push(token)
                chunk["text"] = delta
                if stopped:
                    reason = "stop"
            if is_eos:
                reason = "stop"
            elif reason is None and len(seq.tokens) >= seq.limit:
                reason = "length"
            if reason is not None and seq.text is not None and not seq.text.stopped:
                chunk["text"] += seq.text.finish()
            self._finish(seq, reason, None, chunk, now)
        self._reap()

    def _piece(self, token: int) -> str:
        """A token's own text, for logprobs (a piece of a multi-byte character shows as U+FFFD)."""
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""

    def _finish(self, seq: Sequence, reason: str | None, error: BaseException | None,
                chunk: dict[str, Any] | None = None, now: float | None = None) -> None:
        """Emit a chunk (and end the sequence when ``reason`` or ``error`` says so)."""
        if error is not None:
            seq.finished = True
            seq.queue.put_nowait(error)
            return
        assert chunk is not None
        chunk["finish_reason"] = reason
        chunk["prompt_tokens"] = seq.prompt_len
        chunk["completion_tokens"] = seq.generated
        seq.queue.put_nowait(chunk)
        if reason is not None:
            seq.finished = True
            self.stats["finished"] += 1
            if seq.generated > 1 and seq.first_token_at is not None and now is not None:
                self.m_tpot.observe((now - seq.first_token_at) / (seq.generated - 1))

    def _gauges(self) -> None:
        self.m_running.set(len(self.running))
        self.m_waiting.set(len(self.waiting))
        self.m_kv.set(self.blocks.used / self.blocks.num_blocks)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


__all__ = ["BLOCK_SIZE", "BlockAllocator", "GenerationEngine", "GenerationStream", "usage"]
