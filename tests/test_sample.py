"""The sample command: Hugging Face directory and training workdir inputs, streamed text equal to
`generate`'s tokens, partial UTF-8 held back while streaming, and clear errors."""

import io
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED
from helpers import random_params as shared_random_params

from jaxgpt.data.tokenizer import CharTokenizer, gpt2_tokenizer
from jaxgpt.decode import generation as G
from jaxgpt.decode.options import DecodeOptions
from jaxgpt.io import checkpoint
from jaxgpt.io.workdir import Workdir
from jaxgpt.io.hf import export_hf_gpt2
from jaxgpt.nn.config import GPTConfig
from jaxgpt.sample import SEPARATOR, TextStream, build_parser, main, run

BPE = SHARED / "data" / "gpt2.tiktoken"
needs_bpe = pytest.mark.skipif(not BPE.is_file(), reason=f"{BPE} (offline GPT-2 BPE) is missing")


def random_params(cfg: GPTConfig, seed: int):
    """Fresh random weights of the model's shapes (every leaf N(0, 0.3)), no compile."""
    return shared_random_params(cfg, seed, std=0.3, norm_scales="same")


def sample(argv: list[str]) -> tuple[str, str, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    texts = run(build_parser().parse_args(argv), out=out, err=err)
    return out.getvalue(), err.getvalue(), texts


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 (GPT-2's vocabulary, 1 layer) exported as a Hugging Face directory."""
    cfg = GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)
    params = random_params(cfg, 0)
    d = export_hf_gpt2(cfg, params, tmp_path_factory.mktemp("hf"))
    return d, cfg, params


@needs_bpe
def test_hf_dir_streams_the_text_generate_produces(hf_dir):
    d, cfg, params = hf_dir
    tok = gpt2_tokenizer(BPE)
    prompt = "The meaning of life is"
    out, err, texts = sample(["--init-from", str(d), "--prompt", prompt, "--max-new-tokens", "9", "--seed", "3",
                              "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--chunk-size", "4",
                              "--bpe-file", str(BPE)])
    ref = G.generate(params, cfg, [tok.encode(prompt)], 9,
                     DecodeOptions(seed=3, temperature=0.9, top_k=50, top_p=0.95, eos_id=tok.eot_id))
    want = tok.decode([t for t in np.asarray(ref.tokens[0, :int(ref.lengths[0])]) if t != tok.eot_id])
    assert texts == [want] and want
    assert out == prompt + want + "\n"
    assert "tokens/s decoding" in err and "tokens in" in err


@needs_bpe
def test_num_samples_and_prompt_file(hf_dir, tmp_path, monkeypatch):
    d, cfg, params = hf_dir
    monkeypatch.setenv("JAXGPT_GPT2_BPE", str(BPE))  # the offline BPE through the environment
    (tmp_path / "prompt.txt").write_text("Once upon a time", encoding="utf-8")
    out, _, texts = sample(["--init-from", str(d), "--prompt-file", str(tmp_path / "prompt.txt"),
                            "--num-samples", "2", "--max-new-tokens", "6", "--temperature", "0"])
    tok = gpt2_tokenizer(BPE)
    ref = G.generate(params, cfg, [tok.encode("Once upon a time")] * 2, 6,
                     DecodeOptions(temperature=0, eos_id=tok.eot_id))
    want = [tok.decode([t for t in np.asarray(r[:n]) if t != tok.eot_id]) for r, n in zip(ref.tokens, ref.lengths)]
    assert texts == want and texts[0] == texts[1]  # greedy: both samples agree
    assert out == SEPARATOR.join("Once upon a time" + t for t in texts) + "\n"


@needs_bpe
def test_text_stream_holds_back_partial_utf8():
    tok = gpt2_tokenizer(BPE)
    text = "naïve café — 😀 日本語 ok"
    ids = tok.encode(text)
    writes = []

    class Out:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    s = TextStream(tok, Out())
    for i in ids:  # one token at a time: multi-byte characters span several tokens
        s.add([i])
    assert s.finish() == text
    assert "".join(writes) == text
    assert not any("\ufffd" in w for w in writes)
    assert len([w for w in writes if w]) > 5  # it streamed, not one write at the end


CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def char_run(path: Path, **overrides):
    """A jaxgpt workdir (config.json, tokenizer.json, orbax checkpoints) of a random char model."""
    import orbax.checkpoint as ocp

    tok = CharTokenizer(CHARS)
    cfg = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, **overrides)
    params = random_params(cfg, 1)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": CHARS}))
    mngr = checkpoint.run_checkpoint_manager(Workdir(path).checkpoints)
    mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave({"step": 5})))
    mngr.wait_until_finished()
    mngr.close()
    return cfg, params, tok


def test_training_workdir(tmp_path):
    """A training workdir with a char tokenizer and an int8 cache."""
    cfg, params, tok = char_run(tmp_path)
    out, _, texts = sample(["--init-from", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                            "--seed", "2", "--top-k", "0", "--chunk-size", "8", "--kv-cache", "int8"])
    ref = G.generate(params, cfg, [tok.encode("ROMEO:")], 8, DecodeOptions(seed=2, temperature=0.8,
                                                                               cache_kind="int8"))
    assert texts == [tok.decode(np.asarray(ref.tokens[0]))]
    assert out == "ROMEO:" + texts[0] + "\n"
    with pytest.raises(ValueError, match="prompt is empty"):
        sample(["--init-from", str(tmp_path), "--max-new-tokens", "3"])


def test_writes_500_characters_from_a_block_64_model(tmp_path):
    """nanoGPT's CPU recipe samples 500 characters from a block-64 model: the context slides past the block."""
    char_run(tmp_path, block_size=64, n_layer=1)
    out, _, texts = sample(["--init-from", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "500",
                            "--seed", "4", "--top-k", "0", "--chunk-size", "499"])
    assert len(texts[0]) == 500 and len(set(texts[0])) > 10  # (the window rule: tests/test_generate_window.py)
    assert out == "ROMEO:" + texts[0] + "\n"


def test_speed_counts_only_valid_tokens(tmp_path, monkeypatch):
    """Rows done after eos emit padding; the reported tokens/s counts the valid tokens only (fake chunks and
    a clock that ticks one second per reading)."""
    import jaxgpt.sample as S

    cfg = GPTConfig.preset("tiny", vocab_size=len(CHARS))
    monkeypatch.setattr(S, "load_model", lambda *a: (cfg, None, CharTokenizer(CHARS)))
    counts = [[1, 1], [4, 2], [4, 0], [1, 0]]  # row 1 stops in the first chunk, row 0 in the last
    chunks = [G.Generation(np.full((2, 1 if i == 0 else 4), 5, np.int32), np.array(c)) for i, c in enumerate(counts)]
    monkeypatch.setattr(G, "stream", lambda *a, **k: iter(chunks))
    ticks = iter(range(100))
    monkeypatch.setattr(S, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(ticks)))}))
    _, err, _ = sample(["--init-from", str(tmp_path), "--prompt", "A", "--num-samples", "2"])
    # chunks 3 and 4 reuse a compiled width: 4 + 0 + 1 + 0 valid tokens in 2 s
    assert err.startswith("2.5 tokens/s decoding, 13 tokens in "), err


@pytest.mark.parametrize("argv,message", [
    (["--num-samples", "0"], "--num-samples=0"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--top-p", "0"], "--top-p=0.0"),
    (["--temperature", "-1"], "--temperature=-1.0"),
    (["--top-k", "-3"], "--top-k=-3"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
])
def test_bad_arguments_fail_with_one_clear_line(argv, message, tmp_path, capsys):
    assert main(["--init-from", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxgpt-sample: error: ") and message in err and err.count("\n") == 1


def test_missing_model_fails_clearly(tmp_path, capsys):
    assert main(["--init-from", str(tmp_path / "nowhere" / "model")]) == 2
    assert "config.json and model.safetensors" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("jaxgpt-sample") == "jaxgpt.sample:main"
