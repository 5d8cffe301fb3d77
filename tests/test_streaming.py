"""jaxgpt.data.streaming: streamed shards equal one-process tiktoken of each document, in every source format; resume
after an injected failure and after a killed worker gives the same files; bad input gives one clear line."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import BPE

from jaxgpt.data import memmap, preparation, shards
from jaxgpt.data import streaming as corpus
from jaxgpt.data.tokenizer import GPT2_PAT_STR, gpt2_tokenizer

WORDS = ["the", "a", "Jaxgpt", "naïve", "café", "über", "中文", "テキスト", "🙂", "it's", "we'll", "3.14",
         "2024", "hello,", "world!", "--", "(x)", "\n", "\n\n", "  ", "\t", " \n ", "Ω", "don't"]
SMALL = dict(shard_tokens=4000, val_tokens=1500, chunk_chars=3000)


@pytest.fixture(scope="module")
def ref_encoding():
    """GPT-2 BPE built here from the ranks file, not through jaxgpt.data.tokenizer."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(name="gpt2_ref", pat_str=GPT2_PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(BPE)),
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer(BPE)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(120):
        words = rng.choice(WORDS, size=int(rng.integers(1, 400)))
        seps = rng.choice(["", " ", " ", " ", "  "], size=words.size)
        out.append("".join(s + w for s, w in zip(seps, words)))
    return out


def reference(enc, docs) -> np.ndarray:
    ids = []
    for d in docs:
        ids += [50256] + enc.encode_ordinary(d)
    return np.array(ids)


def read_all(out: Path) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([shards.open_shard(out / s["name"]) for s in m["shards"]])


def write_sources(d: Path, docs) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(exist_ok=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        with open(d / f"part{i}.jsonl", "w", encoding="utf-8") as f:
            for t in part:
                f.write(json.dumps({"id": 1, "body": t}) + "\n")
        pq.write_table(pa.table({"body": part}), d / f"part{i}.parquet", row_group_size=17)
    for i, t in enumerate(docs[:10]):
        (d / f"doc{i:02d}.txt").write_text(t, encoding="utf-8", newline="")
    return {"jsonl": d / "part*.jsonl", "parquet": d / "part*.parquet", "text": d / "doc*.txt"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, docs):
    return write_sources(tmp_path_factory.mktemp("src"), docs)


@pytest.mark.parametrize("fmt,workers", [("jsonl", 2), ("parquet", 0), ("text", 1)])
def test_shards_equal_one_process_tokenization(tmp_path, sources, docs, tok, ref_encoding, fmt, workers):
    files = corpus.expand_inputs(str(sources[fmt]))
    blocks = 64  # plain text is read in small blocks, cut at safe points
    m = corpus.prepare_shards(tmp_path, lambda: corpus.iter_files(files, text_field="body", block_chars=blocks),
                              tok, source={"fmt": fmt}, workers=workers, **SMALL)
    ref = reference(ref_encoding, docs if fmt != "text" else docs[:10])
    np.testing.assert_array_equal(read_all(tmp_path), ref)
    sizes = [s["tokens"] for s in m["shards"]]
    assert m["complete"] and sizes[0] == 1500 and set(sizes[1:-1]) <= {4000} and 0 < sizes[-1] <= 4000
    assert shards.list_shards(tmp_path, "val")[0].name == "shard_val_000000.bin"
    meta = memmap.load_meta(tmp_path)
    assert (meta["kind"], meta["vocab_size"], meta["train_tokens"] + meta["val_tokens"]) == ("gpt2", 50257, ref.size)


def test_safe_cut_keeps_the_tokens_of_the_whole(ref_encoding, docs):
    text = "".join(docs[:30])
    for cut in {corpus.safe_cut(text[:n]) for n in range(50, 3000, 37)} - {0}:
        assert text[cut - 1].isalpha() and text[cut] == " " and text[cut + 1].isalpha()
        assert ref_encoding.encode_ordinary(text[:cut]) + ref_encoding.encode_ordinary(text[cut:]) == \
            ref_encoding.encode_ordinary(text)
    assert corpus.safe_cut("no-safe\npoint,  here ?") == 0 and corpus.safe_cut("ab cd ef") == 5


def test_hf_datasets_from_local_files(tmp_path, sources, docs, tok, ref_encoding):
    m = preparation.prepare_sharded(tmp_path, dataset="hf", hf_name="json", hf_data_files=str(sources["jsonl"]),
                             text_field="body", workers=0, bpe_path=BPE, **SMALL)
    assert m["settings"]["source"]["hf"] == "json"
    np.testing.assert_array_equal(read_all(tmp_path), reference(ref_encoding, docs))


def failing(pieces, at):
    for i, p in enumerate(pieces):
        if i == at:
            raise KeyboardInterrupt  # what Ctrl-C raises
        yield p


def test_interrupted_preparation_resumes_to_identical_shards(tmp_path, sources, tok):
    files = corpus.expand_inputs(str(sources["jsonl"]))
    pieces = lambda: corpus.iter_files(files, text_field="body")  # noqa: E731
    full = corpus.prepare_shards(tmp_path / "full", pieces, tok, source={}, workers=0, **SMALL)
    for at in (37, 81):  # interrupted twice, each time in the middle of a shard
        with pytest.raises(KeyboardInterrupt):
            corpus.prepare_shards(tmp_path / "cut", lambda: failing(pieces(), at), tok, source={}, workers=0,
                                  **SMALL)
        m = json.loads((tmp_path / "cut" / "manifest.json").read_text())
        assert not m["complete"] and m["resume"]["offset"] > 0
    resumed = corpus.prepare_shards(tmp_path / "cut", pieces, tok, source={}, workers=0, **SMALL)
    assert resumed["shards"] == full["shards"]
    for s in full["shards"]:
        assert (tmp_path / "cut" / s["name"]).read_bytes() == (tmp_path / "full" / s["name"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_killed_worker_is_reported_and_resumes(tmp_path, sources, tok, docs, ref_encoding):
    """A worker process killed with SIGKILL: one clear error, then the same command finishes the same shards."""
    import psutil

    files = corpus.expand_inputs(str(sources["jsonl"]))
    others = {c.pid for c in psutil.Process().children()}  # e.g. a GCS emulator a fixture started: not a worker

    def kill_a_worker_at(pieces, at):
        for i, p in enumerate(pieces):
            if i == at:
                workers = [c for c in psutil.Process().children() if c.pid not in others]
                os.kill(workers[0].pid, signal.SIGKILL)
            yield p

    with pytest.raises(RuntimeError, match="exited with code -9; rerun the same command"):
        corpus.prepare_shards(tmp_path, lambda: kill_a_worker_at(corpus.iter_files(files, text_field="body"), 60),
                              tok, source={}, workers=2, **SMALL)
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    corpus.prepare_shards(tmp_path, lambda: corpus.iter_files(files, text_field="body"), tok, source={}, workers=2,
                          **SMALL)
    np.testing.assert_array_equal(read_all(tmp_path), reference(ref_encoding, docs))


class BigVocab:
    kind, vocab_size, eot_id = "cl100k", 100277, 100257


def test_bad_input_lines(tmp_path, sources, tok):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    (bad / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (bad / "c.txt").write_text("")
    (bad / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (bad / "e.bin").write_text("x")
    cases = [("a.jsonl", "a.jsonl:2 has no 'text' field; pass --text-field"),
             ("b.txt", "b.txt is not UTF-8 text"), ("c.txt", "c.txt is empty"),
             ("d.jsonl", "d.jsonl:2 is not valid JSON"), ("e.bin", "pass --format")]
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            list(corpus.iter_files([bad / name]))
    with pytest.raises(ValueError, match="no column 'text'.*--text-field"):
        list(corpus.iter_files(corpus.expand_inputs(str(sources["parquet"]))))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        corpus.expand_inputs(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="vocab_size 100277 does not fit uint16"):
        corpus.prepare_shards(tmp_path / "v", lambda: iter([]), BigVocab(), source={})
    with pytest.raises(ValueError, match="no <|endoftext|>"):
        corpus.prepare_shards(tmp_path / "v", lambda: iter([]), preparation.make_tokenizer("char", "ab"), source={})
    with pytest.raises(ValueError, match="pass a smaller --val-tokens"):
        corpus.prepare_shards(tmp_path / "v", lambda: iter([("tiny", True)]), tok, source={}, workers=0)
    m = corpus.prepare_shards(tmp_path / "v", lambda: iter([("tiny", True)]), tok, source={}, workers=0,
                              val_tokens=1)  # as the error says: nothing was written, so no --overwrite is needed
    assert m["complete"] and [s["tokens"] for s in m["shards"]] == [1, 1]


def test_hf_dataset_that_cannot_be_reached(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline, as the variable HF_HUB_OFFLINE=1 would make it (read at import, so set on the modules)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="cannot open dataset 'nobody/no-such-dataset'.*--dataset files"):
        list(corpus.iter_hf("nobody/no-such-dataset", "sample-10BT"))


def test_output_dir_of_another_tokenizer_or_tool_is_refused(tmp_path, sources, tok):
    files = corpus.expand_inputs(str(sources["jsonl"]))
    pieces = lambda: corpus.iter_files(files, text_field="body")  # noqa: E731
    out = tmp_path / "d"
    corpus.prepare_shards(out, pieces, tok, source={"a": 1}, workers=0, **SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    m = json.loads((out / "manifest.json").read_text())
    m["settings"]["tokenizer"] = {"kind": "char", "vocab_size": 65}  # as if written by another tokenizer
    (out / "manifest.json").write_text(json.dumps(m))
    before["manifest.json"] = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="shards of another tokenizer.*choose another --out"):
        corpus.prepare_shards(out, pieces, tok, source={"a": 1}, workers=0, **SMALL)
    (out / "manifest.json").unlink()
    del before["manifest.json"]
    with pytest.raises(FileExistsError, match="without a manifest.json"):
        corpus.prepare_shards(out, pieces, tok, source={"a": 1}, workers=0, **SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    other = tmp_path / "o"
    corpus.prepare_shards(other, pieces, tok, source={"a": 1}, workers=0, **SMALL)
    with pytest.raises(FileExistsError, match="other settings \\(source\\)"):
        corpus.prepare_shards(other, pieces, tok, source={"a": 2}, workers=0, **SMALL)
    m = corpus.prepare_shards(other, pieces, tok, source={"a": 2}, workers=0, overwrite=True, **SMALL)
    assert m["settings"]["source"] == {"a": 2}


def test_command_line(tmp_path, sources, capsys, docs, ref_encoding):
    preparation.main(["--dataset", "files", "--input", str(sources["parquet"]), "--text-field", "body", "--out",
               str(tmp_path / "c"), "--bpe-path", str(BPE), "--shard-tokens", "5000", "--val-tokens", "2000",
               "--workers", "1", "--prefix", "edu"])
    out = capsys.readouterr().out
    assert "edu_val_000000.bin: 2,000 tokens" in out and "shards" in out
    np.testing.assert_array_equal(read_all(tmp_path / "c"), reference(ref_encoding, docs))
    with pytest.raises(SystemExit, match="drop --tokenizer char"):
        preparation.main(["--dataset", "files", "--input", str(sources["parquet"]), "--tokenizer", "char",
                   "--out", str(tmp_path / "x")])


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def jsonl_preparation(sources, tok):
    """`run(out)`: the in-process preparation of the jsonl sources into out."""
    files = corpus.expand_inputs(str(sources["jsonl"]))

    def run(out: Path) -> dict:
        return corpus.prepare_shards(out, lambda: corpus.iter_files(files, text_field="body"), tok, source={},
                                     workers=0, **SMALL)

    return run


def stopping_after(write, n: int):
    """`write`, and a KeyboardInterrupt right after its n-th call: the process stopped just after that write."""
    calls = [0]

    def wrapped(*args, **kwargs):
        write(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt

    return wrapped


def test_a_stop_after_any_write_resumes_to_identical_files(tmp_path, sources, tok, monkeypatch):
    """Stopped right after each shard file or each manifest write (the first comes before any shard; the last
    records the last shard and `complete: true` together, so no stop leaves a folder a rerun cannot resume), the
    rerun writes the files of an uninterrupted preparation, byte for byte, meta.json too."""
    run = jsonl_preparation(sources, tok)
    run(tmp_path / "full")
    want = files_of(tmp_path / "full")
    full = json.loads(want["manifest.json"])["shards"]
    n = len(full)
    assert n >= 4 and "meta.json" in want
    for module, name, writes in ((shards, "write_shard", n), (corpus, "write_manifest", n + 1)):
        for k in range(1, writes + 1):  # the manifest is written once before the first shard, then after each
            out = tmp_path / f"{name}{k}"
            with monkeypatch.context() as m:
                m.setattr(module, name, stopping_after(getattr(module, name), k))
                with pytest.raises(KeyboardInterrupt):
                    run(out)
            left = corpus.read_manifest(out)
            recorded = k - 1  # shards the manifest holds: a shard file is on disk before its manifest write
            assert left["shards"] == full[:recorded] and left["complete"] == (recorded == n)
            assert not (out / "meta.json").exists()  # written after the manifest says complete
            run(out)
            assert files_of(out) == want, (name, k)


def test_a_manifest_stopped_between_its_last_shard_and_completion_is_finished(tmp_path, sources, tok):
    """The state a stop between recording the last shard and recording completion (two writes in an earlier
    version) leaves: every shard written, `resume.piece` null, `complete: false`. Training refuses it; the rerun
    completes it without a TypeError and without rewriting a shard."""
    from jaxgpt.train import trainer
    from jaxgpt.train.config import load_config_file

    run = jsonl_preparation(sources, tok)
    out = tmp_path / "d"
    run(out)
    want = files_of(out)
    m = json.loads(want["manifest.json"])
    assert m["resume"] == {"piece": None, "offset": 0}
    corpus.write_manifest(out, {**m, "complete": False})
    (out / "meta.json").unlink()
    cfg = load_config_file(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
    cfg.data.dir = str(out)
    line = f"preparation of {out} is not finished: rerun the same `python -m jaxgpt.data` command"
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        trainer.train(cfg, tmp_path / "wd")
    shard_times = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    run(out)
    assert files_of(out) == want
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")} == shard_times
