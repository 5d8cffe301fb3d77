"""Text -> token memmaps (`train.bin` / `val.bin`, uint16) + `meta.json`, and deterministic batch sampling.

A prepared dataset directory holds:
  train.bin, val.bin   uint16 token ids, the first 90% of the text and the last 10% (nanoGPT's layout)
  meta.json            {"kind": "char", "chars": ...} or {"kind": "gpt2"}, plus vocab_size and token counts;
                       `jaxgpt.data.tokenizer.from_meta(meta)` rebuilds the tokenizer

Batches are random windows of the memmap drawn with a NumPy RNG seeded by (seed, split, step): the batch of a
step depends on nothing else, so a resumed run sees exactly the batches an uninterrupted run would have seen.

Large corpora go to llm.c token shards instead (`jaxgpt/data/streaming.py`, `jaxgpt/data/shards.py`, read by
`jaxgpt/data/shard_loader.py`): `--dataset files` (local text / JSON lines / Parquet files by glob) or `--dataset hf` (a
Hugging Face dataset, streamed), GPT-2 BPE, tokenized by all cores, resumable by rerunning the same command.

Command line:
  python -m jaxgpt.data --dataset pydoc --tokenizer char --out data/pydoc_char
  python -m jaxgpt.data --dataset shakespeare --tokenizer char --out data/shakespeare_char [--input FILE]
  python -m jaxgpt.data --dataset text --input corpus.txt --tokenizer gpt2 --bpe-path gpt2.tiktoken --out data/x
  python -m jaxgpt.data --dataset files --input 'corpus/*.jsonl' --text-field text --out data/corpus
  python -m jaxgpt.data --dataset hf --hf-name HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out data/edu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.data.memmap import SPLITS, load_meta  # noqa: F401 (re-exported)
from jaxgpt.data.tokenizer import CharTokenizer, Tokenizer, gpt2_tokenizer, hf_tokenizer

# Named datasets. "pydoc" is built in (the documentation text that ships with every CPython); the others are
# downloaded from their public URL unless a local copy is passed with --input; "text" needs --input.
DATASET_URLS = {
    "shakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
DATASETS = ("pydoc", "text", *DATASET_URLS)
SHARDED = ("files", "hf")  # streamed into llm.c shards
TOKENIZERS = ("char", "gpt2", "hf")  # hf: a Hugging Face model folder's tokenizer.json (its path as bpe_path)
MAX_UINT16_VOCAB = 2**16


def builtin_corpus() -> str:
    """The English documentation text of `pydoc_data.topics` (about 465k characters), present in every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def download(url: str, dest: str | os.PathLike) -> Path:
    """Fetch `url` to `dest` (written to a temporary name, then renamed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"cannot download {url} ({e}); offline, pass a local copy with --input FILE "
                           "(config: --config.data.input=FILE)") from e
    os.replace(tmp, dest)
    return dest


def load_text(dataset: str, input_path: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None) -> str:
    """The raw text of a named dataset: `input_path` when given, else built in or downloaded into cache_dir."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS + SHARDED)}")
    if input_path:
        p = Path(input_path)
        if not p.is_file():
            raise FileNotFoundError(f"input file {p} does not exist; pass the path of a UTF-8 text file")
        text = p.read_text(encoding="utf-8")
    elif dataset == "pydoc":
        text = builtin_corpus()
    elif dataset == "text":
        raise ValueError("dataset 'text' needs an input file; pass --input FILE (config: data.input)")
    else:
        cache = Path(cache_dir or ".") / f"{dataset}.txt"
        if not cache.is_file():
            download(DATASET_URLS[dataset], cache)
        text = cache.read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"dataset {dataset!r} ({input_path or 'built in'}) is empty; pass a non-empty text file")
    return text


def make_tokenizer(kind: str, text: str, bpe_path: str | os.PathLike | None = None) -> Tokenizer:
    """A char tokenizer over the characters of `text`, or GPT-2 BPE (offline from `bpe_path` when given)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return gpt2_tokenizer(bpe_path)
    if kind == "hf":
        if not bpe_path:
            raise ValueError("tokenizer 'hf' needs the model folder holding tokenizer.json as bpe_path (--bpe-path)")
        return hf_tokenizer(bpe_path)
    raise ValueError(f"unknown tokenizer {kind!r}; use one of {', '.join(TOKENIZERS)}")


def tokenizer_meta(tok: Tokenizer) -> dict[str, Any]:
    """The dict `jaxgpt.data.tokenizer.from_meta` rebuilds `tok` from."""
    if tok.kind == "char":
        return {"kind": "char", "chars": tok.chars, "vocab_size": tok.vocab_size}
    if tok.kind == "hf":
        return tok.meta()
    return {"kind": tok.kind, "vocab_size": tok.vocab_size}


def token_dtype(vocab_size: int) -> str:
    """The memmaps' token type: uint16 (nanoGPT's) up to 65,536 ids, uint32 above (Llama 3, Qwen vocabularies)."""
    return "uint16" if vocab_size <= MAX_UINT16_VOCAB else "uint32"


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as `token_dtype(vocab)` [N] (GPT-2 BPE: ordinary text, `<|endoftext|>` is not special
    here)."""
    ids = tok.encode_ordinary(text) if hasattr(tok, "encode_ordinary") else tok.encode(text)
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size))


def prepare(out_dir: str | os.PathLike, *, dataset: str = "pydoc", tokenizer: str = "char",
            input_path: str | os.PathLike | None = None, bpe_path: str | os.PathLike | None = None,
            val_fraction: float = 0.1, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize a dataset into out_dir/{train.bin, val.bin, meta.json}; returns the meta dict.

    The text is split by characters (first 1 - val_fraction for training, the rest for validation) before
    tokenizing, as nanoGPT does. Files are written into a temporary folder and moved in place, so an
    interrupted run never leaves a half-written dataset; an existing dataset is kept unless overwrite=True.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not valid; use a value in (0, 1), e.g. 0.1")
    out = Path(out_dir)
    if (out / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a prepared dataset; pass overwrite=True (--overwrite) "
                              "or choose another --out")
    cache = out.parent if dataset in DATASET_URLS else None
    text = load_text(dataset, input_path, cache)
    tok = make_tokenizer(tokenizer, text, bpe_path)
    n = int(len(text) * (1.0 - val_fraction))
    splits = {"train": encode(tok, text[:n]), "val": encode(tok, text[n:])}
    meta = {**tokenizer_meta(tok), "dataset": dataset, "source": str(input_path or dataset),
            "train_tokens": int(splits["train"].size), "val_tokens": int(splits["val"].size)}
    if token_dtype(tok.vocab_size) != "uint16":  # absent: uint16, as every dataset prepared before
        meta["token_dtype"] = token_dtype(tok.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, ids in splits.items():
            ids.tofile(tmp / f"{name}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        out.mkdir(exist_ok=True)
        for name in ("train.bin", "val.bin", "meta.json"):  # meta.json last: its presence marks a complete set
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare_sharded(out_dir: str | os.PathLike, *, dataset: str, input_glob: str | None = None,
                    file_format: str | None = None, text_field: str = "text", hf_name: str | None = None,
                    hf_config: str | None = None, hf_split: str = "train", hf_data_files: str | None = None,
                    bpe_path: str | os.PathLike | None = None, **kw: Any) -> dict[str, Any]:
    """Stream local files (dataset="files") or a Hugging Face dataset (dataset="hf") into GPT-2 BPE shards.

    kw: shard_tokens, val_tokens, workers, prefix, overwrite, log (see `jaxgpt.data.streaming.prepare_shards`).
    """
    from jaxgpt.data import streaming

    if dataset == "files":
        if not input_glob:
            raise ValueError("dataset 'files' needs --input GLOB (e.g. 'corpus/*.jsonl')")
        files = streaming.expand_inputs(input_glob)
        source = {"files": [str(f) for f in files], "format": file_format, "text_field": text_field,
                  "text_block_chars": streaming.TEXT_BLOCK_CHARS}
        pieces = lambda: streaming.iter_files(files, file_format, text_field)  # noqa: E731
    elif dataset == "hf":
        if not hf_name:
            raise ValueError("dataset 'hf' needs --hf-name NAME (e.g. HuggingFaceFW/fineweb-edu)")
        source = {"hf": hf_name, "config": hf_config, "split": hf_split, "data_files": hf_data_files,
                  "text_field": text_field}
        pieces = lambda: streaming.iter_hf(hf_name, hf_config, hf_split, text_field, hf_data_files)  # noqa: E731
    else:
        raise ValueError(f"unknown sharded dataset {dataset!r}; use one of {', '.join(SHARDED)}")
    return streaming.prepare_shards(out_dir, pieces, gpt2_tokenizer(bpe_path), source=source, **kw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize a dataset into train.bin / val.bin / meta.json, or stream a "
                                            "large corpus (--dataset files|hf) into llm.c token shards.")
    p.add_argument("--dataset", default="pydoc", choices=DATASETS + SHARDED)
    p.add_argument("--tokenizer", default=None, choices=TOKENIZERS, help="default: char; gpt2 for files|hf")
    p.add_argument("--input", default=None, help="local text file (offline copy of a named dataset); "
                                                 "for --dataset files a glob of .txt/.jsonl/.parquet files")
    p.add_argument("--bpe-path", default=None, help="local gpt2.tiktoken for offline GPT-2 BPE")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("sharded corpora (--dataset files|hf)")
    g.add_argument("--format", default=None, choices=("text", "jsonl", "parquet"), help="default: by extension")
    g.add_argument("--text-field", default="text", help="the JSON / Parquet / dataset field holding the text")
    g.add_argument("--hf-name", default=None, help="Hugging Face dataset, e.g. HuggingFaceFW/fineweb-edu")
    g.add_argument("--hf-config", default=None, help="its configuration, e.g. sample-10BT")
    g.add_argument("--hf-split", default="train")
    g.add_argument("--hf-data-files", default=None, help="data_files for a builder such as json or parquet")
    g.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per training shard")
    g.add_argument("--val-tokens", type=int, default=None, help="tokens in the val shard (default: --shard-tokens)")
    g.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    g.add_argument("--prefix", default="shard", help="shard file names: PREFIX_{train,val}_000000.bin")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.dataset in SHARDED:
        if a.tokenizer not in (None, "gpt2"):
            raise SystemExit(f"--dataset {a.dataset} writes uint16 shards of GPT-2 BPE; drop --tokenizer "
                             f"{a.tokenizer} (the char tokenizer needs the whole corpus in memory)")
        m = prepare_sharded(a.out, dataset=a.dataset, input_glob=a.input, file_format=a.format,
                            text_field=a.text_field, hf_name=a.hf_name, hf_config=a.hf_config, hf_split=a.hf_split,
                            hf_data_files=a.hf_data_files, bpe_path=a.bpe_path, shard_tokens=a.shard_tokens,
                            val_tokens=a.val_tokens, workers=a.workers, prefix=a.prefix, overwrite=a.overwrite,
                            log=lambda line: print(line, flush=True))
        n = sum(sh["tokens"] for sh in m["shards"])
        print(f"{a.out}: {len(m['shards'])} shards, {n:,} tokens (gpt2)")
        return
    meta = prepare(a.out, dataset=a.dataset, tokenizer=a.tokenizer or "char", input_path=a.input,
                   bpe_path=a.bpe_path, val_fraction=a.val_fraction, overwrite=a.overwrite)
    print(f"{a.out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']} ({meta['kind']})")


if __name__ == "__main__":
    main()
