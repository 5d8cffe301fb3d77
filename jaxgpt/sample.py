"""Sample from a trained or downloaded GPT-2: `python -m jaxgpt.sample` (also the `jaxgpt-sample` command).

    jaxgpt-sample --init-from gpt2 --prompt "Hello, I'm a language model," --num-samples 3
    jaxgpt-sample --init-from runs/shakespeare_char --prompt "ROMEO:" --temperature 0.8 --top-k 200

--init-from is a Hugging Face GPT-2 directory (config.json + model.safetensors) or Hub name (downloaded
when online), a Llama / Qwen2 / Qwen3 folder (config.json, safetensors weights, tokenizer.json), or a jaxgpt
training workdir (config.json, tokenizer.json, checkpoints/). The GPT-2 BPE loads offline from --bpe-file or
$JAXGPT_GPT2_BPE.

The command is a few small steps in `run`: check arguments -> `load_model` (config, params, tokenizer) ->
`read_prompt` -> decode with `jaxgpt.decode.generation.stream` (past block_size the context slides: --window) -> print.
An option that changes the weights (quantization, LoRA adapters) is one more step on (config, params) after
`load_model`; the cache layout is --kv-cache. Text goes to stdout as it is produced (one sample: every
--chunk-size tokens); the speed goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from jaxgpt.data.tokenizer import BPE_ENV, Tokenizer
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.io.paths import MissingBackend
from jaxgpt.io.workdir import load_model, transform_params

SEPARATOR = "\n---------------\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgpt-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init-from", required=True,
                   help="Hugging Face GPT-2 directory or name (gpt2, gpt2-medium, ...), or a jaxgpt training workdir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue; empty starts from <|endoftext|>")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn (decoded together as one batch)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 disables")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--bpe-file", default=None, help=f"local gpt2.tiktoken for offline GPT-2 BPE (else ${BPE_ENV})")
    p.add_argument("--kv-cache", default="dense",
                   help="KV-cache kind (jaxgpt.decode.cache_kinds): dense (model dtype), float32, bfloat16, int8, "
                        "turbo3, turbo2.5, uniform3, ...")
    p.add_argument("--chunk-size", type=int, default=8, help="tokens per decode call; text is printed after each")
    p.add_argument("--window", type=int, default=None,
                   help="past block_size, a full context keeps its last WINDOW tokens and re-prefills them "
                        "(default block_size // 2; block_size - 1 is nanoGPT's crop at every token)")
    p.add_argument("--adapters", default=None,
                   help="LoRA/RsLoRA adapters folder (jaxgpt.lora.save_adapters, e.g. WORKDIR/lora), merged into the base")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="weight quantization (jaxgpt.quantize) of every matrix and the embeddings (norms and biases stay "
                        "float): int8 per output channel, int4 group-wise (128)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """One clear error per bad value, before anything is loaded."""
    for name, low in (("num_samples", 1), ("max_new_tokens", 1), ("chunk_size", 1), ("top_k", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is not valid; use an integer >= {low}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature={args.temperature} is not valid; use 0 (greedy) or a positive number")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} is not valid; use a value in (0, 1]")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist; pass a UTF-8 text file")


def decode_options(args: argparse.Namespace, eos_id: int | None) -> DecodeOptions:
    """The decoding flags as one DecodeOptions (--top-k 0 and --top-p 1 turn those filters off)."""
    return DecodeOptions(temperature=args.temperature, top_k=args.top_k or None,
                         top_p=args.top_p if args.top_p < 1 else None, seed=args.seed, eos_id=eos_id,
                         window=args.window, cache_kind=args.kv_cache)


def read_prompt(args: argparse.Namespace, tokenizer: Tokenizer) -> list[int]:
    text = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    ids = getattr(tokenizer, "encode_prompt", tokenizer.encode)(text)  # a Hugging Face tokenizer adds its BOS
    if not ids and tokenizer.eot_id is None:
        raise ValueError(f"the prompt is empty and the {tokenizer.kind} tokenizer has no <|endoftext|> to start "
                         "from; pass --prompt with at least one character of its vocabulary")
    return ids


class TextStream:
    """Collects one sample's tokens; with `out`, prints the decoded text as it grows, holding back a trailing
    partial UTF-8 character (decoded as U+FFFD) until the rest of its bytes arrive."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO | None = None) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0  # characters already written

    def add(self, ids: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in ids)
        if self.out is not None:
            self._write(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        if self.out is not None:
            self._write(text)
        return text

    def _write(self, text: str) -> None:
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = max(self.printed, len(text))


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> list[str]:
    """Load, decode, print to `out` / `err` (default: sys.stdout / sys.stderr at the time of the call); returns the
    generated texts (without the prompt)."""
    from jaxgpt.decode.generation import stream

    out, err = out or sys.stdout, err or sys.stderr

    check_args(args)
    config, params, tokenizer = load_model(args.init_from, args.bpe_file)
    params = transform_params(params, args.adapters, args.quantize)
    prompt = read_prompt(args, tokenizer)
    eos = tokenizer.eot_id
    options = decode_options(args, eos)
    n = args.num_samples
    prompt_text = tokenizer.decode(prompt)
    outs = [TextStream(tokenizer, out if n == 1 else None) for _ in range(n)]  # one sample streams
    if n == 1:
        out.write(prompt_text)
    # a chunk width seen before ran without compiling: those chunks give the steady decode speed
    seen, warm_tokens, warm_time, new_tokens = set(), 0, 0.0, 0
    t0 = t = time.perf_counter()
    chunks = stream(params, config, [prompt] * n, args.max_new_tokens, options, chunk_size=args.chunk_size)
    for i, chunk in enumerate(chunks):
        tokens, counts = np.asarray(chunk.tokens), np.asarray(chunk.lengths)  # waits for the chunk
        now, width = time.perf_counter(), tokens.shape[1] if i else "prefill"
        if width in seen:  # rows done after eos emit padding: only valid tokens count
            warm_tokens, warm_time = warm_tokens + int(counts.sum()), warm_time + now - t
        seen.add(width)
        for b, s in enumerate(outs):
            s.add([tok for tok in tokens[b, :counts[b]] if tok != eos])
        new_tokens += int(counts.sum())
        t = time.perf_counter()
    total = time.perf_counter() - t0
    texts = [s.finish() for s in outs]
    if n > 1:
        out.write(SEPARATOR.join(prompt_text + text for text in texts))
    out.write("\n")
    out.flush()
    steady = f"{warm_tokens / warm_time:.1f} tokens/s decoding, " if warm_time > 0 else ""
    err.write(f"{steady}{new_tokens} tokens in {total:.2f} s overall (prefill and compilation included)\n")
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError, MissingBackend) as e:
        print(f"jaxgpt-sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
