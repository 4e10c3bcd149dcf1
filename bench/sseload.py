"""The streaming load generator: OpenAI chat completions over SSE, a separate process driven by JSON lines.

    {"op": "run", "port": P, "model": M, "prompts": [text, ...], "max_tokens": N, "extra": {...},
     "concurrency": C, "warmup": W, "duration": D, "stagger": S, "max_requests": R}
      ->  {"ips": tokens/s in the window, "p50_ms"/"p99_ms": time to first token, ...}

Closed loop: ``concurrency`` streams, each sending ``POST /v1/chat/completions`` with
``"stream": true`` one after the other (stream i starts ``i * stagger / C`` seconds late, so that
requests of equal length do not stay in lock-step). Every request is one HTTP/1.1 connection on
raw asyncio streams (uvloop): no client library between the bytes and the clock. A request's
tokens are the SSE chunks whose ``delta.content`` is non-empty (one token each with the
benchmark's folder, see bench/genprep.py); the final chunk's ``usage.completion_tokens``, when the
server sends it, is checked against that count (``token_mismatch``).

Measured over the window [warmup, warmup + duration] only:
- ``ips`` (= tokens/s): token chunks that arrived in the window / its length, all streams together;
- ``p50_ms``/``p99_ms``/``ttft_*``: time to first token (request sent -> first token chunk) of the
  requests whose first token arrived in the window;
- ``tpot_ms``: time per output token of the requests that finished in the window,
  (last - first token) / (tokens - 1); ``decode_tps`` its inverse (median of per-request values);
- ``client_cpu``: this process's CPU over the window, in cores.

At the end of the window every open stream is closed (a server should then stop generating for
it); the run is bounded by ``max_requests`` and by the window: nothing is drained.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import traceback
from typing import Any


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))]


def med(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return float("nan") if not n else (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


class Req:
    __slots__ = ("sent", "first", "last", "n", "usage", "done", "error", "finish")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.first: float | None = None
        self.last: float | None = None
        self.n = 0
        self.usage: int | None = None
        self.done = False
        self.error: str | None = None
        self.finish: str | None = None


class Run:
    def __init__(self, cmd: dict[str, Any]) -> None:
        self.cmd = cmd
        self.t0 = time.perf_counter()
        self.start = self.t0 + cmd["warmup"]
        self.end = self.start + cmd["duration"]
        self.reqs: list[Req] = []
        self.token_times: list[float] = []
        self.issued = 0
        self.cpu: list[float | None] = [None, None]
        self.host = f"127.0.0.1:{cmd['port']}"
        self.path = cmd.get("path", "/v1/chat/completions")

    def body(self, i: int) -> bytes:
        prompts = self.cmd["prompts"]
        doc = {"model": self.cmd["model"], "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
               "stream": True, "max_tokens": self.cmd["max_tokens"], "temperature": 0.0, **self.cmd.get("extra", {})}
        data = json.dumps(doc).encode()
        return (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data

    def event(self, r: Req, data: bytes) -> bool:
        """One SSE event's data; True at the end of the stream."""
        if data == b"[DONE]":
            return True
        doc = json.loads(data)
        if "error" in doc:
            r.error = str(doc["error"])[:300]
            return True
        for ch in doc.get("choices") or ():
            content = (ch.get("delta") or {}).get("content") or ch.get("text")
            if content:
                now = time.perf_counter()
                if r.first is None:
                    r.first = now
                r.last = now
                r.n += 1
                self.token_times.append(now)
            if ch.get("finish_reason"):
                r.finish = ch["finish_reason"]
        usage = doc.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            r.usage = int(usage["completion_tokens"])
        return False

    async def request(self, i: int) -> None:
        r = Req(time.perf_counter())
        self.reqs.append(r)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.cmd["port"])
        try:
            writer.write(self.body(i))
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            if status != 200:
                rest = await reader.read(2000)
                r.error = f"HTTP {status}: {rest[:300]!r}"
                return
            buf = b""
            while True:
                if chunked:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        break
                    piece = await reader.readexactly(size + 2)
                    buf += piece[:-2]
                else:
                    piece = await reader.read(65536)
                    if not piece:
                        break
                    buf += piece
                buf = buf.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    ev, _, buf = buf.partition(b"\n\n")
                    data = b"\n".join(ln[5:].lstrip() for ln in ev.split(b"\n") if ln.startswith(b"data:"))
                    if data and self.event(r, data):
                        r.done = r.error is None
                        return
            r.done = r.error is None and r.n > 0
        finally:
            writer.close()

    async def stream(self, k: int) -> None:
        await asyncio.sleep(k * self.cmd.get("stagger", 0.0) / self.cmd["concurrency"])
        while time.perf_counter() < self.end and self.issued < self.cmd["max_requests"]:
            i = self.issued
            self.issued += 1
            try:
                await self.request(i)
            except Exception as exc:  # a failed request is counted, the stream goes on
                self.reqs[-1].error = f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(0.05)

    async def go(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.start - time.perf_counter(), lambda: self.cpu.__setitem__(0, cpu_now()))
        loop.call_at(loop.time() + self.end - time.perf_counter(), lambda: self.cpu.__setitem__(1, cpu_now()))
        tasks = [asyncio.ensure_future(self.stream(k)) for k in range(self.cmd["concurrency"])]
        await asyncio.wait(tasks, timeout=max(0.0, self.end - time.perf_counter()))  # or all streams done
        for t in tasks:  # the window is over: close every open stream
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = cpu_now()
        self.cpu = [now if self.cpu[0] is None else self.cpu[0], now if self.cpu[1] is None else self.cpu[1]]
        await asyncio.sleep(0)
        return self.result()

    def result(self) -> dict[str, Any]:
        s, e = self.start, self.end
        window = e - s
        tokens = sum(1 for t in self.token_times if s <= t <= e)
        ttft = [(r.first - r.sent) * 1000 for r in self.reqs if r.first is not None and s <= r.first <= e]
        finished = [r for r in self.reqs if r.done and r.last is not None and s <= r.last <= e]
        tpot = [(r.last - r.first) / (r.n - 1) * 1000 for r in finished if r.n > 1 and r.first is not None]
        errors = [r.error for r in self.reqs if r.error]
        mismatch = sum(1 for r in finished if r.usage is not None and r.usage != r.n)
        short = sum(1 for r in finished if r.n != self.cmd["max_tokens"])
        cpu = self.cpu[1] - self.cpu[0] if None not in self.cpu else float("nan")
        return {"ips": tokens / window, "tokens": tokens, "window_s": window, "requests": len(finished),
                "issued": self.issued, "p50_ms": pct(ttft, 50), "p99_ms": pct(ttft, 99), "ttft_n": len(ttft),
                "ttft_max_ms": max(ttft) if ttft else float("nan"), "tpot_ms": med(tpot),
                "tpot_p99_ms": pct(tpot, 99), "decode_tps": 1000 / med(tpot) if tpot else float("nan"),
                "errors": len(errors), "error_samples": errors[:3], "token_mismatch": mismatch,
                "short_requests": short, "tokens_per_request": med([r.n for r in finished]),
                "client_cpu": cpu / window}


def main() -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            cmd.setdefault("max_requests", 10_000)
            reply = runner(Run(cmd).go())
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
