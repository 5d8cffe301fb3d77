"""The "jaxgpt" lm-eval model against lm-eval's own `hf` model on the same random tiny GPT-2.

Two local tasks (YAMLs over jsonl files the test writes): multiple choice (acc, acc_norm) and rolling
log-likelihood (word/byte perplexity, bits per byte, documents longer than the 64-token window). Both models
must give the same per-request log-likelihoods (1e-4) and the same metrics; generate_until must produce
the same greedy text. The tiny model comes from tests/test_eval.py; lm-eval's hf model gets a Hugging Face
tokenizer built from the offline gpt2.tiktoken. As there, the data is sized so that the scorer's batches
share a few padded shapes (few compiles).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_eval import BLOCK, tiny_hf_gpt2_dir, torch_one_thread, words  # noqa: F401 (fixture)

MC_YAML = """task: jaxgpt_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING_YAML = """task: jaxgpt_test_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def hf_gpt2_tokenizer(bpe_file):
    """GPT-2's tokenizer as a Hugging Face fast tokenizer, built from the tiktoken ranks file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from jaxgpt.data.tokenizer import GPT2_PAT_STR

    tok = TikTokenConverter(vocab_file=str(bpe_file), pattern=GPT2_PAT_STR,
                            extra_special_tokens=["<|endoftext|>"]).converted()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot, unk_token=eot)


@pytest.fixture(scope="module", autouse=True)
def no_environment_report():
    """simple_evaluate reports the environment (`pip list` and more in subprocesses: seconds per call);
    the tests compare results, not that report."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_bpe_file, shared_dir):
    """(hf dir, task dir, jaxgpt LM, hf LM, TaskManager over the local tasks only)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from jaxgpt.data.tokenizer import gpt2_tokenizer
    from jaxgpt.eval.lm_eval_model import JaxGPTLM
    from jaxgpt.io.hf import load_hf_gpt2

    hf_dir, tasks = tiny_hf_gpt2_dir(tmp_path_factory), tmp_path_factory.mktemp("lm_eval_tasks")
    mc = [{"question": words(shared_dir, 10 + i, 26, 32), "label": i % 3,
           "choices": [words(shared_dir, 50 + 3 * i + j, 1, 6) for j in range(3)]} for i in range(6)]
    # 74, 76, 142 and 41 tokens: 4 first windows (one shared context) and 4 more, one batch of 8 rows
    docs = [{"text": words(shared_dir, 90 + i, lo, hi)} for i, (lo, hi) in enumerate(((50, 70), (50, 70),
                                                                                       (100, 110), (10, 30)))]
    for name, rows, yaml in (("mc", mc, MC_YAML), ("rolling", docs, ROLLING_YAML)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(yaml.format(data=tasks / f"{name}.jsonl"))
    cfg, params = load_hf_gpt2(hf_dir)
    ours = JaxGPTLM(params=params, model_cfg=cfg, tokenizer=gpt2_tokenizer(gpt2_bpe_file), batch_size=8)
    theirs = HFLM(pretrained=str(hf_dir), tokenizer=hf_gpt2_tokenizer(gpt2_bpe_file), batch_size=8, device="cpu")
    return hf_dir, tasks, ours, theirs, TaskManager(include_path=str(tasks), include_defaults=False)


def _run(lm, manager):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=["jaxgpt_test_mc", "jaxgpt_test_rolling"], task_manager=manager,
                                   log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def runs(setup):
    """Both tasks evaluated with the jaxgpt model and with lm-eval's hf model."""
    _, _, ours, theirs, manager = setup
    return _run(ours, manager), _run(theirs, manager)


def test_same_loglikelihoods_and_metrics_as_hf(setup, runs):
    ours, (a, b) = setup[2], runs
    for task in ("jaxgpt_test_mc", "jaxgpt_test_rolling"):
        la = [r[0] if isinstance(r, (list, tuple)) else r for s in a["samples"][task] for r in s["resps"]]
        lb = [r[0] if isinstance(r, (list, tuple)) else r for s in b["samples"][task] for r in s["resps"]]
        la, lb = np.array(la, float).ravel(), np.array(lb, float).ravel()
        assert len(la) == len(lb) > 0
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
        ma = {k: v for k, v in a["results"][task].items() if isinstance(v, float)}
        mb = {k: v for k, v in b["results"][task].items() if isinstance(v, float)}
        assert ma.keys() == mb.keys() and len(ma) >= 2
        assert ma == pytest.approx(mb, rel=1e-4)
    assert max(len(ours.tok_encode(s["doc"]["text"])) for s in a["samples"]["jaxgpt_test_rolling"]) > BLOCK


def test_generate_until_matches_hf_greedy(setup, shared_dir):
    from lm_eval.api.instance import Instance

    _, _, ours, theirs, _ = setup
    kwargs = {"until": ["\n\n", "."], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance("generate_until", {}, (words(shared_dir, 300 + i, 2, 70), dict(kwargs)), i) for i in range(3)]
    assert ours.generate_until(reqs) == theirs.generate_until(reqs)


def test_command_and_unknown_task(setup, runs, gpt2_bpe_file, capsys):
    from jaxgpt.eval.__main__ import main

    hf_dir, tasks, _, _, _ = setup
    common = ["lm-eval", "--init-from", str(hf_dir), "--bpe-file", str(gpt2_bpe_file), "--include-path", str(tasks),
              "--only-include-path"]
    assert main([*common, "--tasks", "jaxgpt_test_mc", "--batch-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]["jaxgpt_test_mc"]
    assert set(out) >= {"acc,none", "acc_norm,none"}
    assert [out[k] for k in ("acc,none", "acc_norm,none")] == [runs[0]["results"]["jaxgpt_test_mc"][k]
                                                               for k in ("acc,none", "acc_norm,none")]
    assert main([*common, "--tasks", "jaxgpt_test_mc,no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown lm-eval task(s) ['no_such_task']" in err[0]


def test_registered_by_name(setup, runs, gpt2_bpe_file):
    import lm_eval

    hf_dir, _, _, _, manager = setup
    args = f"init_from={hf_dir},bpe_file={gpt2_bpe_file},batch_size=8"
    by_name = lm_eval.simple_evaluate(model="jaxgpt", model_args=args, tasks=["jaxgpt_test_mc"], task_manager=manager,
                                      bootstrap_iters=0)
    direct = runs[0]  # the same model passed as an object, on the same tasks
    assert by_name["results"]["jaxgpt_test_mc"] == direct["results"]["jaxgpt_test_mc"]
