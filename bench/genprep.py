"""Write the generation benchmark's BLOOM folder and its prompts (deterministic; nothing downloaded).

    python bench/genprep.py OUTDIR --config 560m|small --prompt-len 32 --prompts 64
        -> prints {"folder", "prompts": [text, ...], "prompt_ids": [[id, ...], ...], ...} as JSON

The folder is ``models.bloom.random_bloom_folder`` (random weights, seed 0, the locally trained
byte-level BPE tokenizer and the chat template in tokenizer_config.json) with bloom-560m's
architecture (hidden 1024, 16 heads, 24 layers, vocabulary 250880) or a small one for smoke runs.

One change to the random weights, so that a streamed token is always a streamed piece of text:
the tied embedding rows of every id that is not a plain printable-ASCII token of the tokenizer
(ids above its ~400 tokens, special tokens, lone UTF-8 bytes) are scaled by 1e-3. Greedy decoding
then only ever picks such tokens (their logits are ~1000x smaller), so each generated token decodes
to at least one character on its own and every server sends one SSE chunk per token: chunk
arrival times are token times. Shapes, and so the cost of every step (the full 250880-wide
lm_head included), are unchanged.

Prompts: ``--prompts`` chat messages of ``--prompt-len`` words, each word one token of the
tokenizer (with its leading space), drawn with a seeded RNG: every prompt has exactly the same
token count after the chat template, and no two share a long prefix (no prefix cache helps anyone).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# bloom-560m (bigscience/bloom-560m config.json): the architecture the issue names.
BLOOM_560M = {"hidden_size": 1024, "n_head": 16, "n_layer": 24, "vocab_size": 250880, "seq_length": 2048}
# A CI-sized stand-in: a few ms per step on one core (the vocabulary is the tokenizer's, padded: ~450).
BLOOM_SMALL = {"hidden_size": 256, "n_head": 8, "n_layer": 4, "seq_length": 2048}
CONFIGS = {"560m": BLOOM_560M, "small": BLOOM_SMALL}


def live_ids(tok) -> list[int]:
    """Ids that decode, alone, to non-empty printable ASCII (no special tokens, no partial UTF-8)."""
    special = {tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        if i in special:
            continue
        text = tok.decode([i], skip_special_tokens=True)
        if text and text.isascii() and text.isprintable():
            out.append(i)
    return out


def write(out: Path, config: str, prompt_len: int, n_prompts: int, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer as HFTokenizer

    from models.bloom import random_bloom_folder

    folder = out / f"bloom-{config}"
    done = folder / ".bench-ready"
    tok = None
    if not done.is_file():
        random_bloom_folder(folder, CONFIGS[config], seed=seed)
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        live = live_ids(tok)
        path = folder / "model.safetensors"
        state = load_file(str(path))
        emb = state["transformer.word_embeddings.weight"]
        scale = torch.full((emb.shape[0], 1), 1e-3, dtype=emb.dtype)
        scale[live] = 1.0
        state["transformer.word_embeddings.weight"] = (emb * scale).contiguous()
        save_file(state, str(path), metadata={"format": "pt"})
        done.write_text(json.dumps({"live_ids": len(live)}) + "\n")
    tok = tok or HFTokenizer.from_file(str(folder / "tokenizer.json"))
    # single-token words: " word" encodes to exactly one id, printable ASCII
    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("\u0120") and len(t) > 2 and t[1:].isascii()
                    and t[1:].isalpha() and len(tok.encode(" " + t[1:]).ids) == 1})
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    rng = random.Random(seed)
    prompts: list[str] = []
    ids: list[list[int]] = []
    for _ in range(100 * n_prompts):  # a leading space on every word: each one is one token
        if len(prompts) == n_prompts:
            break
        text = "".join(" " + rng.choice(words) for _ in range(prompt_len))
        x = hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
        if not ids or len(x) == len(ids[0]):
            prompts.append(text)
            ids.append(x)
    lens = sorted({len(x) for x in ids})
    cfg = json.loads((folder / "config.json").read_text())
    return {"folder": str(folder), "config": config, "arch": {k: cfg.get(k) for k in ("hidden_size", "n_head", "n_layer",
                                                                                        "vocab_size")},
            "prompts": prompts, "prompt_ids": ids, "prompt_tokens": lens, "words": len(words),
            **json.loads(done.read_text())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--prompt-len", type=int, default=32, help="words (= tokens) of the user message")
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(write(out, args.config, args.prompt_len, args.prompts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
