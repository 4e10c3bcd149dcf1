"""Text around a language model: tokenizer, chat template, streaming detokenization, stop strings.

Torch-free (the ``tokenizers`` library and jinja2 only), so an API process can tokenize without
loading torch.

* ``Tokenizer``: ``tokenizer.json`` through the ``tokenizers`` library (what transformers' fast
  tokenizers wrap, so ids are the same), special tokens and ``chat_template`` from
  ``tokenizer_config.json`` (or ``chat_template.jinja``, where transformers 5 saves it).
* ``IncrementalDetokenizer``: one token id in, the new text out; never a broken UTF-8 character.
* ``find_stop`` / ``TextStream``: stop strings that never leak, even when split across tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from models.spec import InputError

__all__ = ["IncrementalDetokenizer", "StopMatch", "TextStream", "Tokenizer", "find_stop"]

REPLACEMENT = "\ufffd"  # what a decoder emits for bytes that do not (yet) form a UTF-8 character


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what transformers keeps beside it (special tokens, chat template)."""

    def __init__(self, tokenizer: Any, config: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
        self.tk = tokenizer
        self.config = dict(config or {})
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.bos_token_id = self._special("bos_token")
        self.eos_token, self.eos_token_id = self._special("eos_token")
        self.pad_token, self.pad_token_id = self._special("pad_token")
        self.chat_template: str | None = chat_template if chat_template is not None else self._template()
        self._compiled = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            return None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second one wins
            p = folder / name
            if p.is_file():
                try:
                    loaded = json.loads(p.read_text(encoding="utf-8"))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}: not valid JSON: {exc}") from None
                if isinstance(loaded, dict):
                    config.update(loaded)
        template = None
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(HFTokenizer.from_file(str(path)), config, template)

    def _special(self, name: str) -> tuple[str | None, int | None]:
        """(text, id) of a special token named in the config (a string or an AddedToken dict)."""
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str):
            return None, None
        return value, self.tk.token_to_id(value)

    def _template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...] (named templates)
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default")
        return t if isinstance(t, str) else None

    # -- ids <-> text ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. BLOOM's tokenizer.json adds nothing (no BOS); special tokens written in
        the text (``</s>`` from a chat template) become their ids, as in transformers."""
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (transformers' default keeps special tokens; servers usually skip them)."""
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the chat template in a sandboxed jinja2 environment, as transformers does.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
        ``pad_token`` and ``kwargs``; it may call ``raise_exception(msg)`` (an ``InputError``: the
        conversation is the client's, e.g. roles that do not alternate).
        """
        if self.chat_template is None:
            raise InputError("this model has no chat template")
        template = self._compiled_template()
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   "pad_token": self.pad_token or "", **kwargs}
        try:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except InputError:
            raise
        except Exception as exc:  # a template error on this conversation (a missing key, a sandbox refusal)
            raise InputError(f"chat template failed: {type(exc).__name__}: {exc}") from None

    def _compiled_template(self):
        if self._compiled is None:
            from jinja2 import ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise InputError(f"chat template: {message}")

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                       sort_keys: bool = False) -> str:
                # jinja's own tojson escapes HTML characters, which would change the prompt text
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled


class IncrementalDetokenizer:
    """Streaming decode: ``push(id)`` returns the text that id adds, whole characters only.

    Byte-level BPE splits a multi-byte character (accents, CJK, emoji) over several tokens; until
    the last byte arrives, decoding ends in U+FFFD, and that text is held back. Each push decodes
    only a window of the ids (from the start of the last complete text), so a long generation
    costs O(n), not O(n^2). ``flush()`` returns what is still held (a genuinely undecodable tail).

    Invariant: ``"".join(pushes) + flush() == tokenizer.decode(all ids)`` for decoders whose
    output for a concatenation is the concatenation of the outputs (byte-level BPE, BLOOM's).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids[prefix:read] decode to complete text already emitted
        self.read = 0  # ids before this are emitted
        self.done = ""  # the text of ids[prefix:read]
        self.emitted: list[str] = []

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if text.endswith(REPLACEMENT) or not text.startswith(self.done):
            return ""  # an incomplete character: wait for its next byte
        new = text[len(self.done):]
        self.prefix, self.read, self.done = self.read, len(self.ids), new
        self.emitted.append(new)
        return new

    def flush(self) -> str:
        """The held-back tail (if the stream ends inside a character, its U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        new = text[len(self.done):] if text.startswith(self.done) else ""
        self.prefix, self.read, self.done = self.read, len(self.ids), new
        self.emitted.append(new)
        return new

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self.emitted)


class StopMatch(NamedTuple):
    """Where streaming stands against the stop strings.

    ``cut``: index into the text where the first stop string begins (the output ends there, the
    stop string excluded, as OpenAI's API does), or None. ``safe``: how much of the text may be sent
    now; ``len(text) - safe`` trailing characters are held because they could begin a stop string.
    """

    cut: int | None
    safe: int


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> StopMatch:
    """Check ``text`` (all output so far) against ``stops``.

    ``start``: where new text begins (everything before it was checked already), so the search
    is incremental: only from ``start - (longest stop - 1)``. Returns the earliest match; without a
    match, ``safe`` is the length minus the longest suffix of ``text`` that is a proper prefix of a
    stop string.
    """
    stops = [s for s in stops if s]
    if not stops:
        return StopMatch(None, len(text))
    longest = max(len(s) for s in stops)
    lo = max(0, start - longest + 1)
    cuts = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    if cuts:
        cut = min(cuts)
        return StopMatch(cut, cut)
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):  # longest first; stop once no longer beats hold
            if text.endswith(s[:n]):
                hold = n
                break
    return StopMatch(None, len(text) - hold)


class TextStream:
    """Detokenizer + stop strings for one streamed sequence: what to send after each token.

    ``push(id) -> (delta, stopped)``: ``delta`` is text safe to send now; ``stopped`` is True once a
    stop string appeared (the output was cut before it; push no more). ``finish()`` returns the
    remaining text when generation ended for another reason (EOS, max_tokens, context).
    ``text`` is the final output.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = list(stops)
        self.buffer = ""  # all text decoded so far
        self.sent = 0  # characters of buffer sent
        self.stopped = False

    def _advance(self, new: str, final: bool) -> str:
        start = len(self.buffer)
        self.buffer += new
        m = find_stop(self.buffer, self.stops, start)
        if m.cut is not None:
            self.stopped = True
            self.buffer = self.buffer[:m.cut]
            end = m.cut
        else:
            end = len(self.buffer) if final else m.safe
        delta = self.buffer[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._advance(self.detok.push(token_id), final=False), self.stopped

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._advance(self.detok.flush(), final=True)

    @property
    def text(self) -> str:
        return self.buffer
