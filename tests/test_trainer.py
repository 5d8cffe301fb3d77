"""jaxgpt.train.trainer on llm.c token shards, with the optional hooks: HellaSwag beside val loss, TensorBoard event
files, a profiler trace. The first loss is recomputed from the loader's batch; the logged HellaSwag accuracy is
recomputed from the checkpoint of the same step."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import SHARED

from jaxgpt.data import shard_loader as loader
from jaxgpt.data import shards
from jaxgpt.data.tokenizer import gpt2_tokenizer
from jaxgpt.eval import hellaswag
from jaxgpt.io.workdir import Workdir
from jaxgpt.nn.model import init_params
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics, steps, trainer

pytestmark = pytest.mark.run

REPO = Path(__file__).resolve().parents[1]
BPE = SHARED / "data" / "gpt2.tiktoken"


def tiny_config():
    return train_config.load_config_file(str(REPO / "configs" / "tiny.py"))


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """Shards written as llm.c writes them (no meta.json: GPT-2 BPE is assumed), a tiny model trained 4 steps."""
    root = tmp_path_factory.mktemp("shards")
    tok = gpt2_tokenizer(BPE)
    ids = np.asarray(tok.encode((SHARED / "data" / "tinyshakespeare.txt").read_text()[:40_000]), np.uint16)
    d = root / "data"
    d.mkdir()
    shards.write_shard(d / shards.shard_name("x", "val", 0), ids[:2000])
    shards.write_shard(d / shards.shard_name("x", "train", 1), ids[2000:6000])
    shards.write_shard(d / shards.shard_name("x", "train", 2), ids[6000:])
    examples = [{"ctx": "The king said", "endings": [" yes.", " no, my lord.", " go away now.", " what?"], "label": i % 4}
                for i in range(3)]
    (root / "hs.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    c = tiny_config()
    c.data.dir, c.data.bpe_path = str(d), str(BPE)
    c.max_iters, c.eval_interval, c.ckpt_interval, c.eval_iters, c.warmup_iters, c.lr_decay_iters = 4, 2, 2, 1, 1, 4
    c.eval_hellaswag_every, c.hellaswag_path = 2, str(root / "hs.jsonl")
    c.profile_steps, c.sample_tokens = (3, 3), 5  # a step with no evaluation in it: a small trace
    c.progress = True
    wd, bars = root / "wd", []
    make_bar = trainer.progress_bar
    trainer.progress_bar = lambda *a: bars.append(make_bar(*a)) or bars[-1]  # keeps the run's bar to read
    try:
        summary = trainer.train(c, wd)
    finally:
        trainer.progress_bar = make_bar
    return c, wd, summary, bars


def test_first_loss_is_the_loaders_batch_on_the_initial_params(shard_run):
    c, wd, summary, _ = shard_run
    cfg, _, tok = Workdir(wd).load()
    assert tok["kind"] == "gpt2" and cfg.vocab_size == 50257 and summary["step"] == 4
    x, y = loader.ShardLoader(c.data.dir, "train", c.batch_size, cfg.block_size, c.seed).batch_at(0)
    loss = steps.make_loss_fn(cfg)(init_params(cfg, c.seed), None, x, y, jax.random.PRNGKey(0), True)
    first = [r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"][0]
    np.testing.assert_allclose(first["loss"], float(loss), rtol=1e-6)


def test_hellaswag_is_logged_beside_the_val_loss(shard_run):
    c, wd, _, _ = shard_run
    logged = {r["step"]: r for r in metrics.read_metrics(wd / "metrics.jsonl") if "hellaswag_acc" in r}
    assert sorted(logged) == [2, 4] and all(logged[s]["hellaswag_n"] == 3 for s in logged)
    cfg, params, _ = Workdir(wd).load(2)
    ref = hellaswag.evaluate(params, cfg, hellaswag.load_examples(c.hellaswag_path), gpt2_tokenizer(BPE))
    assert (logged[2]["hellaswag_acc"], logged[2]["hellaswag_acc_norm"]) == (ref["acc"], ref["acc_norm"])


def test_tensorboard_events_and_the_profile_trace_are_written(shard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, wd, _, _ = shard_run
    ea = EventAccumulator(str(wd / "tensorboard"))
    ea.Reload()
    logged = [r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"]
    tb = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(tb) == [r["step"] for r in logged]
    np.testing.assert_allclose([tb[r["step"]] for r in logged], [r["loss"] for r in logged], rtol=1e-6)
    assert "eval/val_loss" in ea.Tags()["scalars"]
    assert list((wd / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    assert [r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "profile"] == [4]


def test_the_progress_bar_shows_the_last_logged_loss_and_tokens_per_second(shard_run):
    _, wd, _, bars = shard_run
    (bar,) = bars
    last = [r for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert bar.n == bar.total == 4 and last["step"] == 3  # the ETA is tqdm's own, from n, total and the rate
    assert bar.postfix == ", ".join(f"{k}={v}" for k, v in trainer.bar_postfix(last).items()), bar.postfix
    assert bar.postfix.startswith(f"loss={last['loss']:.4f}, tok/s=")


@pytest.mark.parametrize("tps, shown", [(None, None), (950.4, "950"), (12_345.0, "12.3k"), (2.5e6, "2500.0k")])
def test_bar_postfix_gives_the_loss_to_4_places_and_tokens_per_second(tps, shown):
    got = trainer.bar_postfix({"loss": 2.718281, "tokens_per_s": tps, "mfu": None})
    assert got == {"loss": "2.7183", **({"tok/s": shown} if shown else {})}
