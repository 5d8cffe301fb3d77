"""jaxgpt.eval against plain transformers implementations of the same recipes, on a random tiny GPT-2.

The model is a random transformers GPT2LMHeadModel (GPT-2's 50257-token vocabulary, 2 layers, 32 wide,
64 positions) saved to a folder once per test session, so jaxgpt (`load_hf_gpt2`) and transformers read
the same weights; both are fed the tokens of the offline gpt2.tiktoken. The data is text from
tinyshakespeare written by the tests. The lm-eval comparison is in tests/test_eval_lm_eval.py.

Most of the time is compiling the scorer, once per padded batch shape, so every test scores 8 rows per
call and its data is sized to land on a few shared shapes (contexts padded to 64 tokens, continuations to
16 or 64), which the jit cache reuses from test to test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import chex
import numpy as np
import pytest
import torch

from jaxgpt.data.tokenizer import gpt2_tokenizer
from jaxgpt.eval import hellaswag
from jaxgpt.eval.__main__ import main
from jaxgpt.eval.perplexity import perplexity, windows
from jaxgpt.eval.scoring import score
from jaxgpt.io.hf import load_hf_gpt2
from jaxgpt.io.workdir import transform_params

BLOCK = 64


def save_tiny_hf_gpt2(path, seed: int = 0) -> None:
    """A random GPT2LMHeadModel in `path` (jaxgpt reads its tokens with tiktoken, so no tokenizer files)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)


def words(shared_dir, seed: int, lo: int, hi: int) -> str:
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text().split()
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, len(text) - hi))
    return " ".join(text[start:start + int(rng.integers(lo, hi))])


def tiny_hf_gpt2_dir(tmp_path_factory) -> Path:
    """The tiny model folder, made once per test session for both eval test files (built in a temporary
    folder, then renamed into place)."""
    path = tmp_path_factory.getbasetemp() / "tiny_hf_gpt2"
    if not path.is_dir():
        tmp = tmp_path_factory.mktemp("tiny_hf_gpt2_partial")
        save_tiny_hf_gpt2(tmp)
        tmp.rename(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """The tiny model's forwards are too small to share between threads: one thread is faster (much
    faster when other processes hold the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_gpt2_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def models(hf_dir, gpt2_bpe_file):
    """(jaxgpt config, params, tokenizer, transformers model) on the same weights."""
    from transformers import GPT2LMHeadModel

    cfg, params = load_hf_gpt2(hf_dir)
    return cfg, params, gpt2_tokenizer(gpt2_bpe_file), GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory, shared_dir):
    """12 HellaSwag-format examples; two contexts are longer than the model's 64 positions, the others
    34 to 64 tokens, endings at most 16 (every batch pads to the same lengths)."""
    path = tmp_path_factory.mktemp("hellaswag") / "val.jsonl"
    lines = []
    for i in range(12):
        ctx = words(shared_dir, 100 + i, 70, 80) if i in (3, 7) else words(shared_dir, 100 + i, 28, 36)
        endings = [words(shared_dir, 1000 + 4 * i + j, 2, 8) for j in range(4)]
        lines.append(json.dumps({"ctx": ctx, "endings": endings, "label": i % 4, "ind": i}))
    path.write_text("\n".join(lines) + "\n")
    return path


def torch_hellaswag(model, tokenizer, examples) -> tuple[np.ndarray, np.ndarray]:
    """The completion-style recipe in plain transformers: per example, the 4 rows context + ending
    (right-padded, left-truncated to the model's 64 + 1 tokens; the last token is only a target) in one
    forward; loss over the ending tokens. Returns sum and mean loss [n, 4]."""
    sums, means = [], []
    for ex in examples:
        ctx = tokenizer.encode(ex["ctx"])
        rows = [(ctx + end)[-(BLOCK + 1):] for end in (tokenizer.encode(" " + e) for e in ex["endings"])]
        n_end = [len(tokenizer.encode(" " + e)) for e in ex["endings"]]
        T = max(len(r) for r in rows) - 1
        inp = torch.zeros((4, T), dtype=torch.long)
        tgt = torch.zeros((4, T), dtype=torch.long)
        mask = torch.zeros((4, T), dtype=torch.bool)
        for b, r in enumerate(rows):
            inp[b, :len(r) - 1] = torch.tensor(r[:-1])
            tgt[b, :len(r) - 1] = torch.tensor(r[1:])
            mask[b, len(r) - 1 - n_end[b]:len(r) - 1] = True
        with torch.no_grad():
            logits = model(inp).logits  # [4, T, V]
        logp = torch.log_softmax(logits[mask].double(), -1)  # [n, V] at the ending tokens only
        loss = torch.zeros((4, T), dtype=torch.float64)
        loss[mask] = -logp.gather(-1, tgt[mask][:, None])[:, 0]  # cross-entropy
        sums.append(loss.sum(1).numpy())
        means.append((loss.sum(1) / mask.sum(1)).numpy())
    return np.array(sums), np.array(means)


def test_hellaswag_matches_transformers_recipe(models, hellaswag_file):
    cfg, params, tok, hf = models
    examples = hellaswag.load_examples(hellaswag_file)
    res = hellaswag.evaluate(params, cfg, examples, tok, batch_size=2, details=True)
    sums, means = torch_hellaswag(hf, tok, examples)
    chex.assert_trees_all_close(res["sum_loss"], sums, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(res["avg_loss"], means, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res["pred"], sums.argmin(1))
    np.testing.assert_array_equal(res["pred_norm"], means.argmin(1))
    labels = np.array([ex["label"] for ex in examples])
    assert res["acc"] == pytest.approx(np.mean(sums.argmin(1) == labels))
    assert res["acc_norm"] == pytest.approx(np.mean(means.argmin(1) == labels))
    assert res["n"] == 12 and res["truncated"] == 2
    assert hellaswag.load_examples(hellaswag_file, limit=5) == examples[:5]


def torch_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) by one transformers forward over ctx + cont, left-truncated to 64 + 1 tokens."""
    seq, n = (ctx + cont)[-(BLOCK + 1):], len(cont)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0, -n:].double(), -1)  # [n, V]
    return float(logp[torch.arange(n), torch.tensor(cont)].sum())


def test_scoring_groups_and_pads_like_single_requests(models):
    """Ragged requests in batches score as transformers scores each one alone: an over-long context whose
    4 continuations truncate it 4 ways, contexts shared by 2, 10 (a group split over batches) and 6
    requests, and a one-token context (nothing cached) padded beside a long one."""
    cfg, params, _, hf = models
    rng = np.random.default_rng(1)
    long_ctx = rng.integers(0, 50257, 70).tolist()
    reqs = [(long_ctx, rng.integers(0, 50257, n).tolist()) for n in (2, 4, 6, 8)]
    for n_ctx, n_req in ((55, 2), (50, 2), (40, 10), (1, 6)):
        ctx = rng.integers(0, 50257, n_ctx).tolist()
        reqs += [(ctx, rng.integers(0, 50257, int(rng.integers(1, 9))).tolist()) for _ in range(n_req)]
    s = score(params, cfg, reqs, batch_size=8)
    chex.assert_trees_all_close(s.logprob, np.array([torch_logprob(hf, c, x) for c, x in reqs]), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(s.truncated, [len(c) > BLOCK + 1 - len(x) for c, x in reqs])
    with pytest.raises(ValueError, match="exceeds the model's window"):
        score(params, cfg, [([1], [2] * (BLOCK + 1))])


def torch_perplexity(model, ids: list[int], max_length: int, stride: int) -> float:
    """Hugging Face's perplexity guide (labels -100 outside each window's new tokens), each token counted once."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    ids_t = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids_t[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss.double()
        n = int((labels[:, 1:] != -100).sum())
        nll_sum, n_tokens, prev_end = nll_sum + float(loss) * n, n_tokens + n, end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("max_length,stride", [(64, 24), (48, 48)])
def test_perplexity_matches_transformers_recipe(models, shared_dir, max_length, stride):
    cfg, params, tok, hf = models
    ids = tok.encode(words(shared_dir, 7, 140, 150))  # 229 tokens: 8 or 5 windows, one batch of 8
    res = perplexity(params, cfg, ids, stride=stride, max_length=max_length, batch_size=8)
    assert res["ppl"] == pytest.approx(torch_perplexity(hf, ids, max_length, stride), rel=1e-4)
    spans = windows(len(ids), max_length, stride)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert res["windows"] == len(spans) and res["n_tokens"] == len(scored) == len(set(scored))


def test_commands(hf_dir, gpt2_bpe_file, hellaswag_file, shared_dir, tmp_path, models, capsys):
    cfg, params, tok, _ = models
    common = ["--init-from", str(hf_dir), "--bpe-file", str(gpt2_bpe_file)]
    out = tmp_path / "res" / "hs.json"
    assert main(["hellaswag", *common, "--data", str(hellaswag_file), "--limit", "6", "--batch-size", "2",
                 "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    ref = hellaswag.evaluate(params, cfg, hellaswag.load_examples(hellaswag_file, 6), tok, batch_size=2)
    assert got == pytest.approx(ref) and "1 of 6 examples were longer" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text(words(shared_dir, 3, 80, 90))
    assert main(["perplexity", *common, "--file", str(text), "--stride", "16", "--quantize", "int8"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = perplexity(transform_params(params, None, "int8"), cfg, tok.encode(text.read_text()), stride=16)
    assert got == pytest.approx(ref, rel=1e-6)


def test_bad_input(hf_dir, gpt2_bpe_file, hellaswag_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = hellaswag_file.read_text().splitlines()
    bad.write_text("\n".join([good[0], good[1], '{"ctx": "A man", "endings": ["a", "b"'] + good[2:]))
    with pytest.raises(ValueError, match=rf"{bad}:3: not valid JSON"):
        hellaswag.load_examples(bad)
    bad.write_text(good[0] + "\n" + json.dumps({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}))
    with pytest.raises(ValueError, match=rf"{bad}:2: 'endings' must be a list of 4"):
        hellaswag.load_examples(bad)
    common = ["--init-from", str(hf_dir), "--bpe-file", str(gpt2_bpe_file)]
    assert main(["hellaswag", *common, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert main(["perplexity", *common, "--file", str(bad), "--stride", "0"]) == 2
    assert "stride=0 is not valid" in capsys.readouterr().err


def test_adapters_for_another_base(hf_dir, gpt2_bpe_file, hellaswag_file, tmp_path, capsys):
    import jax

    from jaxgpt import lora
    from jaxgpt.nn.config import GPTConfig
    from jaxgpt.nn.model import init_params

    other_cfg = GPTConfig(vocab_size=64, block_size=BLOCK, n_layer=2, n_head=2, n_embd=48)
    other = jax.eval_shape(lambda: init_params(other_cfg, 0))  # shapes are all the adapters need
    lcfg = lora.LoraConfig(rank=2, alpha=4)
    lora.save_adapters(tmp_path / "lora", lora.init_lora(jax.random.PRNGKey(0), other, lcfg), lcfg)
    args = ["hellaswag", "--init-from", str(hf_dir), "--bpe-file", str(gpt2_bpe_file), "--data",
            str(hellaswag_file), "--adapters", str(tmp_path / "lora")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "were made for a base whose" in err
