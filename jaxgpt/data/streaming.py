"""Streaming corpora -> token shards: documents from local files or a Hugging Face dataset, tokenized by a pool
of worker processes, cut into llm.c shards (`jaxgpt/data/shards.py`), resumable after an interruption.

Sources yield *pieces* `(text, starts_doc)`. Every document starts a piece; `<|endoftext|>` is put before each
document, as llm.c and modded-nanogpt do. A long plain-text file is read in blocks cut where GPT-2's
pre-tokenizer splits anyway (letter, space, letter: no pre-token spans that space), so memory is bounded by the
block and the tokens equal those of the whole file encoded at once.

The pool tokenizes chunks of pieces with a bounded number in flight (`Pool.imap` would read the whole input
ahead), collected in submission order, so the shards do not depend on the number of workers. After each shard
`manifest.json` records where the stream stands (piece index and token offset into it); a rerun of the same
command skips what is written and continues from the last complete shard, producing the same files. The last
shard and `complete: true` are recorded by one write, and `meta.json` follows; training refuses a directory
whose manifest is not complete (`check_finished`).
"""

from __future__ import annotations

import glob as globlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from jaxgpt.data import shards

Piece = tuple[str, bool]  # (text, starts a document)
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet"}
MANIFEST = "manifest.json"
TEXT_BLOCK_CHARS = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Sources


def expand_inputs(patterns: str | Iterable[str]) -> list[Path]:
    """Files matching one or more globs, sorted within each pattern; an empty match is an error."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    files = []
    for pat in patterns:
        found = sorted(Path(p) for p in globlib.glob(str(pat), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"no file matches {pat}; pass an existing file or a glob such as 'corpus/*.jsonl'")
        files += found
    return files


def file_format(path: Path, fmt: str | None = None) -> str:
    """`text`, `jsonl` or `parquet`: `fmt` when given, else from the file extension."""
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in ("text", "jsonl", "parquet"):
        raise ValueError(f"cannot tell the format of {path} from its extension; pass --format text|jsonl|parquet")
    return fmt


def safe_cut(block: str) -> int:
    """The last index i with block[i-1] a letter, block[i] a space, block[i+1] a letter; 0 when none.

    GPT-2's pre-tokenizer never joins a letter with a following space, and a space before a letter starts a
    pre-token, so encoding block[:i] and block[i:] apart gives the tokens of the whole."""
    i = block.rfind(" ", 0, len(block) - 1)
    while i > 0:
        if block[i - 1].isalpha() and block[i + 1].isalpha():
            return i
        i = block.rfind(" ", 0, i)
    return 0


def iter_text_file(path: Path, block_chars: int = TEXT_BLOCK_CHARS) -> Iterator[Piece]:
    """One document per file, read in blocks of about `block_chars` characters cut at safe points."""
    carry, first = "", True
    with open(path, encoding="utf-8", newline="") as f:
        while True:
            block = f.read(block_chars)
            if not block:
                break
            carry += block
            cut = safe_cut(carry)
            if cut:
                yield carry[:cut], first
                carry, first = carry[cut:], False
    if carry:
        yield carry, first
    elif first:
        raise ValueError(f"{path} is empty; remove it from the inputs or pass a glob that skips it")


def iter_jsonl_file(path: Path, text_field: str) -> Iterator[Piece]:
    """One document per line: the `text_field` string of each JSON object (blank lines skipped)."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{lineno} has no {text_field!r} field; pass --text-field NAME "
                                 "with the field that holds the text") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string; "
                                 "pass --text-field NAME with the field that holds the text")
            n += 1
            yield text, True
    if not n:
        raise ValueError(f"{path} holds no JSON lines; remove it from the inputs or pass a glob that skips it")


def iter_parquet_file(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[Piece]:
    """One document per row of the `text_field` column, read a record batch at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"{path} is not a readable Parquet file ({e}); fix or remove it") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                         "pass --text-field NAME")
    if not pf.metadata.num_rows:
        raise ValueError(f"{path} holds no rows; remove it from the inputs or pass a glob that skips it")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield text or "", True


def iter_files(files: list[Path], fmt: str | None = None, text_field: str = "text",
               block_chars: int = TEXT_BLOCK_CHARS) -> Iterator[Piece]:
    """The pieces of every file in order; decoding errors name the file."""
    for path in files:
        kind = file_format(path, fmt)
        try:
            if kind == "text":
                yield from iter_text_file(path, block_chars)
            elif kind == "jsonl":
                yield from iter_jsonl_file(path, text_field)
            else:
                yield from iter_parquet_file(path, text_field)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 "
                             "or remove it from the inputs") from None


def iter_hf(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
            data_files: str | list[str] | None = None) -> Iterator[Piece]:
    """Documents of a Hugging Face dataset, streamed (`datasets.load_dataset(..., streaming=True)`)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("streaming a Hugging Face dataset needs `datasets`; pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # noqa: BLE001 - hub, network and file errors come in many types
        raise RuntimeError(f"cannot open dataset {name!r} (config {config!r}, split {split!r}): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check the name, "
                           "or offline pass local files (--dataset files --input GLOB)") from None
    if first is None:
        raise ValueError(f"dataset {name!r} split {split!r} holds no documents; choose another split")
    for row in _chain(first, it):
        if text_field not in row:
            raise ValueError(f"dataset {name!r} has no field {text_field!r} (fields: {', '.join(row)}); "
                             "pass --text-field NAME")
        yield row[text_field] or "", True


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------------------
# Tokenizing: worker processes fed round-robin, results read back in the same order


def encode_pieces(tokenizer: Any, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a chunk of pieces, `<|endoftext|>` before each document: (uint16 [N], lengths [P])."""
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    eot = [tokenizer.eot_id]
    ids = [(eot + encode(text)) if starts else encode(text) for text, starts in pieces]
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for a, n in zip(ids, lengths):
        tokens[pos:pos + n] = a
        pos += n
    return tokens, lengths


def _worker(tokenizer: Any, tasks: Any, results: Any) -> None:
    """A worker process: encode chunks from `tasks` until None, put ("ok", result) or ("error", line)."""
    while (chunk := tasks.get()) is not None:
        try:
            results.put(("ok", encode_pieces(tokenizer, chunk)))
        except Exception as e:  # noqa: BLE001 - reported to the parent as one line
            results.put(("error", f"{type(e).__name__}: {e}"))


class TokenizerPool:
    """`workers` processes; `map(chunks)` yields encode_pieces of each chunk in order, at most 2 in flight each.

    Chunk i goes to worker i % workers and is read back from that worker's result queue, so the order is fixed
    without sequence numbers, and the input is read only as fast as the workers consume it (bounded memory).
    workers=0 encodes in this process.
    """

    def __init__(self, tokenizer: Any, workers: int) -> None:
        self.tokenizer, self.n = tokenizer, workers
        # fork: the workers run only tiktoken and NumPy; spawn would re-import JAX in each of them
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.tasks = [ctx.Queue(maxsize=2) for _ in range(workers)]
        self.results = [ctx.Queue() for _ in range(workers)]
        self.procs = [ctx.Process(target=_worker, args=(tokenizer, t, r), daemon=True)
                      for t, r in zip(self.tasks, self.results)]
        for p in self.procs:
            p.start()

    def _get(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        import queue

        while True:
            try:
                status, value = self.results[w].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise RuntimeError(f"tokenizer worker {w} exited with code {self.procs[w].exitcode}; "
                                       "rerun the same command to resume from the last complete shard") from None
        if status == "error":
            raise RuntimeError(f"tokenizer worker {w} failed: {value}")
        return value

    def map(self, chunks: Iterable[list[Piece]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.n == 0:
            yield from (encode_pieces(self.tokenizer, c) for c in chunks)
            return
        sent = got = 0
        for chunk in chunks:
            if sent - got == 2 * self.n:  # every queue holds two: take the oldest result first
                yield self._get(got % self.n)
                got += 1
            self.tasks[sent % self.n].put(chunk)
            sent += 1
        while got < sent:
            yield self._get(got % self.n)
            got += 1

    def close(self) -> None:
        for p, t in zip(self.procs, self.tasks):
            if p.is_alive():
                try:
                    t.put_nowait(None)
                except Exception:  # noqa: BLE001 - a full queue: terminate below
                    pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()

    def __enter__(self) -> "TokenizerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            for p in self.procs:
                p.terminate()
        self.close()


def chunked(pieces: Iterable[Piece], chunk_chars: int) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped into lists of about `chunk_chars` characters."""
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------------
# Preparing a shard directory, resumable


def read_manifest(out: Path) -> dict[str, Any] | None:
    f = out / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); pass --overwrite to prepare this directory again") from None


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    shards.atomic_write_bytes(out / MANIFEST, [json.dumps(manifest, indent=1).encode()])


def check_finished(data_dir: str | os.PathLike) -> None:
    """Refuse a shard directory whose preparation was interrupted (its manifest says `complete: false`).

    A directory without a manifest (shards made by llm.c, modded-nanogpt or by hand) passes."""
    manifest = read_manifest(Path(data_dir))
    if manifest is not None and not manifest.get("complete"):
        raise ValueError(f"preparation of {data_dir} is not finished: rerun the same `python -m jaxgpt.data` command")


def write_meta(out: Path, manifest: dict[str, Any]) -> None:
    """meta.json of a complete preparation (as `jaxgpt.data.prepare` writes), from its manifest alone."""
    s = manifest["settings"]
    n_val = manifest["shards"][0]["tokens"]  # shard 0 is the val shard
    total = sum(sh["tokens"] for sh in manifest["shards"])
    meta = {**s["tokenizer"], "format": "shards", "train_tokens": total - n_val, "val_tokens": n_val,
            "source": s["source"]}
    shards.atomic_write_bytes(out / "meta.json", [json.dumps(meta, indent=1).encode()])


def check_out_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest to resume from (None: start afresh); refuses a directory holding other shards."""
    old = read_manifest(out)
    existing = shards.list_shards(out, "train") + shards.list_shards(out, "val")
    if overwrite:
        for p in existing + [out / MANIFEST, out / "meta.json"]:
            p.unlink(missing_ok=True)
        return None
    if old is None:
        if existing:
            raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...) without a {MANIFEST}; "
                                  "choose another --out or pass --overwrite")
        return None
    if not old.get("shards") and not existing:  # stopped before its first shard: start afresh, any settings
        return None
    was = old.get("settings", {})
    if was.get("tokenizer") != settings["tokenizer"]:
        raise FileExistsError(f"{out} holds shards of another tokenizer ({was.get('tokenizer')}, not "
                              f"{settings['tokenizer']}); choose another --out or pass --overwrite")
    if was != settings:
        diff = sorted(k for k in settings if was.get(k) != settings[k])
        raise FileExistsError(f"{out} holds a preparation with other settings ({', '.join(diff)}); rerun it with "
                              "the same ones to resume, choose another --out or pass --overwrite")
    return old


def prepare_shards(out_dir: str | os.PathLike, pieces: Callable[[], Iterable[Piece]], tokenizer: Any, *,
                   source: dict[str, Any], shard_tokens: int = 10**8, val_tokens: int | None = None,
                   workers: int | None = None, prefix: str = "shard", chunk_chars: int = 1 << 20,
                   overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tokenize the stream `pieces()` into llm.c shards in out_dir; returns the manifest.

    source: what the pieces are (it goes into the manifest: a rerun with another source is refused).
    val_tokens: size of the held-out shard (default shard_tokens). workers: default all cores; 0 = in process.
    A rerun of an interrupted preparation continues after its last complete shard.
    """
    if tokenizer.eot_id is None:
        raise ValueError(f"tokenizer {tokenizer.kind!r} has no <|endoftext|> to separate documents; "
                         "use --tokenizer gpt2 for sharded corpora")
    shards.check_vocab_fits(tokenizer.vocab_size)
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    settings = {"tokenizer": {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size)}, "source": source,
                "shard_tokens": int(shard_tokens), "val_tokens": int(val_tokens), "prefix": prefix,
                "chunk_chars": int(chunk_chars)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = check_out_dir(out, settings, overwrite)
    if manifest is None:  # recorded before the first shard, so a stop after that shard leaves a resumable folder
        manifest = {"format": "llm.c uint16 v1", "settings": settings, "shards": [], "complete": False,
                    "resume": {"piece": 0, "offset": 0}}
        write_manifest(out, manifest)
    if not manifest["complete"] and manifest["resume"]["piece"] is None:
        # every shard is written; an earlier version stopped between recording the last one and completion
        manifest["complete"] = True
        write_manifest(out, manifest)
    if not manifest["complete"]:
        _run(out, manifest, pieces, tokenizer, workers, log or (lambda s: None))
    if not (out / "meta.json").is_file():  # written last: a stop just before it leaves a complete manifest
        write_meta(out, manifest)
    return manifest


def _run(out: Path, manifest: dict[str, Any], pieces: Callable[[], Iterable[Piece]], tokenizer: Any,
         workers: int | None, log: Callable[[str], None]) -> None:
    s = manifest["settings"]
    start, skip = manifest["resume"]["piece"], manifest["resume"]["offset"]
    cur = {"piece": start, "cum": np.zeros(1, np.int64), "base": skip}  # the chunk being written

    def on_shard(index: int, path: Path, n: int, consumed: int | None) -> None:
        if consumed is None:
            resume = {"piece": None, "offset": 0}
        else:
            j = int(np.searchsorted(cur["cum"], consumed, side="right"))  # pieces of the chunk fully written
            off = consumed - (int(cur["cum"][j - 1]) if j else 0) + (cur["base"] if j == 0 else 0)
            resume = {"piece": cur["piece"] + j, "offset": off}
        manifest["shards"].append({"name": path.name, "tokens": n})
        manifest["resume"] = resume
        manifest["complete"] = consumed is None  # the last shard (from `finish`): one write records both
        write_manifest(out, manifest)
        log(f"{path.name}: {n:,} tokens")

    writer = shards.ShardWriter(out, s["prefix"], s["shard_tokens"], s["val_tokens"],
                                start_index=len(manifest["shards"]), on_shard=on_shard)
    stream = iter(pieces())
    for _ in range(start):  # written already: read past without tokenizing
        if next(stream, None) is None:
            raise ValueError(f"{out}/{MANIFEST} resumes at piece {start} but the source ends before it; "
                             "the source changed: pass --overwrite to prepare again")
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    with TokenizerPool(tokenizer, n_workers) as pool:
        for tokens, lengths in pool.map(chunked(stream, s["chunk_chars"])):
            if skip:  # the first piece after a resume: its first `skip` tokens are in the last shard
                tokens, lengths = tokens[skip:], np.concatenate([[lengths[0] - skip], lengths[1:]])
            cur["cum"] = np.cumsum(lengths)
            writer.add(tokens)
            cur["piece"] += len(lengths)
            cur["base"] = skip = 0
    total = sum(sh["tokens"] for sh in manifest["shards"]) + writer.fill
    if writer.index + (writer.fill > 0) < 2:  # the val shard and at least one training token
        raise ValueError(f"the corpus holds {total:,} tokens, not more than val_tokens={s['val_tokens']:,}, so "
                         "no training shard would be written; pass a smaller --val-tokens")
    writer.finish()  # a partial last shard is recorded with `complete: true` in the same manifest write
    if not manifest["complete"]:  # the stream ended exactly at a shard boundary: nothing was left to write
        manifest["complete"] = True
        write_manifest(out, manifest)
