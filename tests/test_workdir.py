"""jaxgpt.io.workdir: every file of a run is named once, and a run directory written by an earlier jaxgpt (the
layout before the package was regrouped into subpackages, kept in tests/data/run_before_regroup: configs/tiny.py
trained 40 steps, checkpoints at 20 and 40) still resumes, samples and exports. References: a run of the same
config trained straight through, and transformers' GPT2LMHeadModel on the export."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from helpers import REPO, xla_env

from jaxgpt.io.hf import export_hf_gpt2
from jaxgpt.io.workdir import Workdir, load_model
from jaxgpt.nn.model import GPT
from jaxgpt.train import config as train_config
from jaxgpt.train import trainer

BEFORE = Path(__file__).resolve().parent / "data" / "run_before_regroup"


def test_every_file_of_a_run_keeps_the_name_earlier_runs_wrote(tmp_path):
    wd = Workdir(tmp_path)
    names = {"model_config": "config.json", "tokenizer": "tokenizer.json", "train_config": "train_config.json",
             "lora_run": "lora_run.json", "checkpoints": "checkpoints", "metrics": "metrics.jsonl",
             "tensorboard": "tensorboard", "plot": "loss.png", "sample": "sample.txt", "adapters": "lora",
             "hf_export": "hf", "profile": "profile", "data": "data", "lock": ".lock", "lock_guard": ".lock.guard",
             "metrics_parts": "metrics.jsonl.parts"}
    assert {k: getattr(wd, k) for k in names} == {k: tmp_path / v for k, v in names.items()}
    assert wd.checkpoint(250) == tmp_path / "checkpoints" / "250"
    assert {p.name for p in BEFORE.iterdir()} <= set(names.values())  # the old run holds no other file


def test_a_bucket_workdir_names_its_files_under_its_url_and_its_dataset_in_a_local_cache(tmp_path, monkeypatch):
    pytest.importorskip("gcsfs")
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path))
    wd = Workdir("gs://bkt/runs/a")
    assert wd.in_bucket and not Workdir(tmp_path).in_bucket
    assert str(wd.checkpoint(250)) == "gs://bkt/runs/a/checkpoints/250" and str(wd.lock) == "gs://bkt/runs/a/.lock"
    assert str(wd.metrics_parts) == "gs://bkt/runs/a/metrics.jsonl.parts"
    assert wd.data == tmp_path / "buckets" / "gs" / "bkt" / "runs" / "a" / "data"


def test_a_bucket_workdir_without_gcsfs_is_refused_in_one_line_naming_the_extra(monkeypatch, capsys):
    from jaxgpt import sample
    from jaxgpt.io import paths

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    want = "gs://bkt/run needs the gcs extra: pip install 'jaxgpt[gcs]'"
    with pytest.raises(paths.MissingBackend) as e:
        Workdir("gs://bkt/run")
    assert str(e.value) == want
    with pytest.raises(paths.MissingBackend, match=re.escape(want)):
        trainer.train(train_config.load_config_file(str(REPO / "configs" / "tiny.py")), "gs://bkt/run")
    assert sample.main(["--init-from", "gs://bkt/run"]) == 2
    assert capsys.readouterr().err == f"jaxgpt-sample: error: {want}\n"


def test_train_py_refuses_a_bucket_workdir_without_gcsfs_in_one_line(tmp_path):
    hidden = tmp_path / "site" / "gcsfs"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('gcsfs is not installed')\n")
    p = subprocess.run([sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
                        "--workdir=gs://bkt/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=xla_env(PYTHONPATH=str(tmp_path / "site")))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == "train.py: gs://bkt/run needs the gcs extra: pip install 'jaxgpt[gcs]'"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["site"]  # no ./gs: folder


def test_a_url_of_an_unknown_scheme_or_a_mangled_one_is_refused_not_made_a_local_folder():
    with pytest.raises(ValueError, match=r"memory://x/run: the scheme memory:// is not supported; use a local path "
                                         "or a gs://"):
        Workdir("memory://x/run")
    with pytest.raises(ValueError, match=r"gs:/b/run is a bucket URL that lost a slash .* pass the URL as a string"):
        Workdir(Path("gs://b/run"))


def test_a_workdir_that_is_not_a_run_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a jaxgpt training workdir"):
        Workdir(tmp_path).load()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="train first"):
        Workdir(tmp_path).load()


@pytest.fixture()
def before(tmp_path) -> Path:
    """A writable copy of the run written before the regrouping."""
    return Path(shutil.copytree(BEFORE, tmp_path / "before"))


def tiny(pydoc_char_dir, max_iters: int):
    c = train_config.load_config_file(str(REPO / "configs" / "tiny.py"))
    c.data.dir, c.max_iters, c.sample_tokens, c.tensorboard = str(pydoc_char_dir), max_iters, 0, False
    return c


@pytest.mark.run
def test_a_run_from_before_the_regrouping_resumes_where_a_straight_run_would_be(before, tmp_path, pydoc_char_dir):
    assert Workdir(before).load()[1]["wte"]["embedding"].shape == (103, 16)
    resumed = trainer.train(tiny(pydoc_char_dir, 60), before)
    straight = trainer.train(tiny(pydoc_char_dir, 60), tmp_path / "straight")
    assert resumed["start_step"] == 40 and resumed["step"] == 60 == straight["step"]
    _, at40, _ = Workdir(before).load(40)  # the old step is still there, unchanged
    _, straight40, _ = Workdir(tmp_path / "straight").load(40)
    at60, straight60 = Workdir(before).load(60)[1], Workdir(tmp_path / "straight").load(60)[1]
    try:  # the fixture was written on one CPU; another instruction set (AVX2 / AVX-512) rounds XLA's sums
        chex.assert_trees_all_equal(at40, straight40)  # differently, so bitwise equality holds only where
    except AssertionError:  # this machine computes the first 40 steps bit for bit as the one that wrote them
        chex.assert_trees_all_close(at40, straight40, atol=2e-6, rtol=0)  # float32 rounding over 40 steps
        chex.assert_trees_all_close(at60, straight60, atol=1e-5, rtol=0)
        assert abs(resumed["val_loss"] - straight["val_loss"]) < 1e-5
        return
    assert resumed["val_loss"] == straight["val_loss"]
    chex.assert_trees_all_equal(at60, straight60)


def test_a_run_from_before_the_regrouping_samples(before):
    from jaxgpt.sample import build_parser, run

    out, err = io.StringIO(), io.StringIO()
    texts = run(build_parser().parse_args(["--init-from", str(before), "--prompt", "def ", "--max-new-tokens", "12",
                                           "--seed", "3"]), out=out, err=err)
    chars = load_model(before)[2].chars
    assert len(texts) == 1 and len(texts[0]) == 12 and set(texts[0]) <= set(chars)  # 12 new characters


def test_a_run_from_before_the_regrouping_exports_what_transformers_reads(before, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params, tok = load_model(before)
    export_hf_gpt2(cfg, params, tmp_path / "hf")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = np.asarray([tok.encode("def main(argv):\n    return 0")], np.int32)  # [1, T]
    ours = np.asarray(GPT(cfg).apply({"params": params}, jax.numpy.asarray(x)))
    with torch.no_grad():
        theirs = model(torch.from_numpy(x).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)
