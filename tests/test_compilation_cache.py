"""jaxgpt.train.compilation_cache: a second run of the same config loads every compiled step from the cache and trains
bitwise the same; the user's own JAX setting wins; bad paths get a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxgpt.train import compilation_cache

REPO = Path(__file__).resolve().parents[1]

# two training runs in one fresh interpreter (the cache is process-wide and set before the first compilation);
# JAX reports every persistent-cache lookup as a monitoring event
TWO_RUNS = r"""
import json, sys
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]  # tests.test_train imports helpers
import jax
from jaxgpt.train import compilation_cache
from jaxgpt.train import metrics
from jaxgpt.train import trainer
from tests.test_train import tiny_config
from pathlib import Path

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
used = compilation_cache.enable({cache!r}, min_compile_secs=0.0)
out = {{"used": used}}
for run in ("cold", "warm"):
    del events[:]
    c = tiny_config(Path({data!r}), max_iters=12, eval_interval=6, ckpt_interval=6, lr_decay_iters=12,
                    sample_tokens=0, progress=False)
    wd = Path({tmp!r}) / run
    trainer.train(c, wd)
    out[run] = {{"hits": events.count("/jax/compilation_cache/cache_hits"),
                 "misses": events.count("/jax/compilation_cache/cache_misses"),
                 "metrics": [r for r in metrics.read_metrics(wd / "metrics.jsonl")
                             if r["kind"] in ("train", "eval")]}}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.run
def test_second_run_loads_every_compilation_and_trains_the_same(tmp_path, pydoc_char_dir):
    cache = tmp_path / "xla"
    script = TWO_RUNS.format(repo=str(REPO), cache=str(cache), data=str(pydoc_char_dir), tmp=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["used"] == str(cache)
    cold, warm = out["cold"], out["warm"]
    if warm["misses"] and "Target machine feature" in p.stderr:
        pytest.skip("XLA:CPU rejects its own cached executables on this host (jax-ml/jax#38445): "
                    + next(line for line in p.stderr.splitlines() if "Target machine feature" in line)[-200:])
    # the cold run compiles (and writes) the init, train step, evaluation and the small helpers; the warm run
    # finds all of them: no lookup misses
    assert cold["misses"] >= 3 and cold["hits"] == 0
    assert warm["misses"] == 0 and warm["hits"] >= 3
    assert len(list(cache.iterdir())) >= 3
    # loaded executables compute exactly what freshly compiled ones do (losses, norms, evaluations)
    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu", "data_wait")} for r in rs]

    assert strip(warm["metrics"]) == strip(cold["metrics"]) and len(cold["metrics"]) == 12 + 2


def test_empty_path_leaves_jax_alone():
    before = jax.config.jax_compilation_cache_dir
    assert compilation_cache.enable("") is None and compilation_cache.enable(None) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_training_default_leaves_the_cpu_alone(tmp_path):
    if jax.config.jax_compilation_cache_dir or jax.default_backend() != "cpu":
        pytest.skip("needs the CPU backend and no JAX_COMPILATION_CACHE_DIR")
    assert compilation_cache.enable_for_training(str(tmp_path / "xla")) is None
    assert not (tmp_path / "xla").exists() and not jax.config.jax_compilation_cache_dir


def test_training_on_cpu_when_asked(tmp_path):
    if jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX_COMPILATION_CACHE_DIR is set: enable() keeps it")
    secs = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert compilation_cache.enable_for_training(str(tmp_path / "xla"), 0.25, on_cpu=True) == str(tmp_path / "xla")
        assert (tmp_path / "xla").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:  # process-wide settings: leave them as they were (nothing compiled in between)
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", secs)


def test_jax_setting_wins(tmp_path):
    mine = str(tmp_path / "mine")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", mine)
    try:
        assert compilation_cache.enable(str(tmp_path / "other")) == mine
        assert not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_bad_path_and_threshold_are_refused(tmp_path):
    if jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX_COMPILATION_CACHE_DIR is set: enable() keeps it")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the compilation cache directory .*compilation_cache_dir"):
        compilation_cache.enable(blocker / "xla")
    with pytest.raises(ValueError, match="min_compile_secs"):
        compilation_cache.enable(tmp_path / "xla", min_compile_secs=-1)
    assert jax.config.jax_compilation_cache_dir in (None, "")
