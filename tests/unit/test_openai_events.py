"""Streamed OpenAI events: the text-only fast path writes exactly what the general path would."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.frontends.openai import OpenAIRequest, _event, stream_events
from tests.unit.fakes import run

TEXTS = [" plain", 'a "quoted" \\ back\\slash', "line\nbreak\ttab", "émoji 🎉 中文", "nul \0 inside", "</s>"]


class ListStream:
    """A generation stream replaying chunks, as the engine's GenerationStream yields them."""

    def __init__(self, chunks: list[dict]) -> None:
        self.chunks, self.prompt_tokens = list(chunks), 7

    def __aiter__(self) -> ListStream:
        return self

    async def __anext__(self) -> dict:
        await asyncio.sleep(0)
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.chunks = []


def expected_events(req: OpenAIRequest, texts: list[str]) -> list[bytes]:
    chat = req.kind == "chat"
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{req.id}", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": req.created, "model": req.model}
    extra = {"usage": None} if req.include_usage else {}
    out = []
    if chat:
        out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}], **extra})
    for n, text in enumerate(texts, 1):
        reason = "length" if n == len(texts) else None
        choice = ({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": reason} if chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        out.append({**base, "choices": [choice], **extra})
    if req.include_usage:
        out.append({**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(texts),
                                                     "total_tokens": 7 + len(texts)}})
    return [_event(d) for d in out] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_only_events_are_byte_for_byte_the_general_encoding(kind: str, include_usage: bool) -> None:
    req = OpenAIRequest(kind=kind, model='m"odel', requests=[{}], stream=True, include_usage=include_usage)
    chunks = [{"text": t, "token_ids": [i], "finish_reason": "length" if i == len(TEXTS) else None,
               "prompt_tokens": 7, "completion_tokens": i} for i, t in enumerate(TEXTS, 1)]

    async def main() -> list[bytes]:
        return [e async for e in stream_events(req, [ListStream(chunks)])]

    got = run(main)
    assert got == expected_events(req, TEXTS)
    for event in got[:-1]:  # and each is one valid JSON document
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        json.loads(event[6:])
