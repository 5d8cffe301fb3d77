"""jaxgpt.train.config: configs load without JAX, unknown --config keys get one line naming the nearest keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.train import config as train_config

REPO = Path(__file__).resolve().parents[1]


def test_configs_import_no_jax():
    code = ("import sys; sys.path.insert(0, '.'); import configs.default, configs.gpt2_124m, configs.finetune_lora, "
            "configs.shakespeare_char_cpu; configs.gpt2_124m.get_config(); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_override_keys_are_checked():
    c = train_config.base_config()
    train_config.check_override_keys(c, ["--config.model.n_layer=3", "--config.lora.rank=8", "--workdir=x"])
    with pytest.raises(ValueError, match=r"no key 'model.n_layr'; did you mean model.n_layer"):
        train_config.check_override_keys(c, ["--config.model.n_layr=3"])
    with pytest.raises(ValueError, match=r"no key 'nonexistent'"):
        train_config.check_override_keys(c, ["--config.nonexistent=3"])


def test_train_py_refuses_an_unknown_key_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.nonexistent=3",
                        f"--workdir={tmp_path / 'wd'}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == ("train.py: --config.nonexistent: the config has no key 'nonexistent'; "
                                "see jaxgpt/train/config.py for the keys")
    assert not (tmp_path / "wd").exists()
