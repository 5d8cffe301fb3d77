"""Training on a device mesh (config.mesh): the tiny config trained on 8 fake CPU devices with data=2 x fsdp=4
gives the per-step losses of the same run on one device (float32, rtol 1e-5: only the reduction order differs),
dropout included."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import xla_env

from jaxgpt.train import metrics, trainer

pytestmark = pytest.mark.run

REPO = Path(__file__).resolve().parents[1]
STEPS = 6

# runs in a fresh interpreter, where XLA_FLAGS gives 8 CPU devices
MESH_RUN = r"""
import importlib.util, json, sys
import jax, numpy as np
from jaxgpt import sharding as sh
from jaxgpt.train import metrics
from jaxgpt.train import run as runs
from jaxgpt.train import steps
from jaxgpt.train import trainer
from jaxgpt.train.config import MeshConfig, OptimConfig

spec = importlib.util.spec_from_file_location("tiny", sys.argv[1] + "/configs/tiny.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
c = mod.get_config()
c.update_from_flattened_dict(json.loads(sys.argv[2]))
c.mesh.data, c.mesh.fsdp = 2, 4
summary = trainer.train(c, sys.argv[3])
losses = [r["loss"] for r in metrics.read_metrics(sys.argv[3] + "/metrics.jsonl") if r["kind"] == "train"]

# the shardings train() used: which leaves of the state (and of a frozen base) are split over "fsdp"
mesh, fn = steps.mesh_shardings_fn(MeshConfig.of(c.mesh), c.batch_size)
from jaxgpt.nn.model import init_params
cfg = runs.model_config(c.model.to_dict(), c.mixed_precision, 96)
params = jax.eval_shape(lambda: init_params(cfg, 0))
state = jax.eval_shape(lambda p: steps.init_state(p, steps.make_optimizer(OptimConfig.of(c))), params)
s = fn(state, params)
try:
    steps.mesh_shardings_fn(MeshConfig.of(c.mesh), 4)
    batch_error = ""
except ValueError as e:
    batch_error = str(e)
specs = sh.spec_summary(s.state)
print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape), "losses": losses,
                  "val_loss": summary["val_loss"],
                  "fsdp_leaves": sorted(k for k, v in specs.items() if "fsdp" in v),
                  "frozen_fsdp": sum("fsdp" in v for v in sh.spec_summary(s.frozen).values()),
                  "batch": list(s.batch.spec), "batch_error": batch_error}))
"""


def tiny_config(data_dir: Path):
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.update_from_flattened_dict(overrides(data_dir))
    return c


def overrides(data_dir: Path) -> dict:
    # batch 8 splits over the 8 devices; min_shard_size 256 makes the tiny model's kernels fsdp-sharded;
    # with dropout on, each device must draw its own slice of the masks one device draws whole
    return {"data.dir": str(data_dir), "batch_size": 8, "model.dropout": 0.1, "max_iters": STEPS,
            "lr_decay_iters": STEPS, "warmup_iters": 2, "eval_interval": STEPS, "ckpt_interval": STEPS,
            "eval_iters": 2, "sample_tokens": 0, "mesh.min_shard_size": 256}


def test_data_by_fsdp_mesh_matches_one_device(pydoc_char_dir, tmp_path):
    single = trainer.train(tiny_config(pydoc_char_dir), tmp_path / "one")
    ref = [r["loss"] for r in metrics.read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]

    env = xla_env(8)
    proc = subprocess.run([sys.executable, "-c", MESH_RUN, str(REPO), json.dumps(overrides(pydoc_char_dir)),
                           str(tmp_path / "mesh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["mesh"] == {"data": 2, "fsdp": 4}
    assert "params/h_0/attn/c_attn/kernel" in out["fsdp_leaves"]  # weights are really split ...
    assert any(k.startswith("opt_state") and k.endswith("c_fc/kernel") for k in out["fsdp_leaves"])  # ... and Adam
    assert out["frozen_fsdp"] > 0 and out["batch"] == [None, ["data", "fsdp"]]
    assert "config.batch_size=4 cannot be split over the 8 devices" in out["batch_error"]
    assert len(out["losses"]) == len(ref) == STEPS
    np.testing.assert_allclose(out["losses"], ref, rtol=1e-5)
    np.testing.assert_allclose(out["val_loss"], single["val_loss"], rtol=1e-5)
    assert ref[-1] < ref[0]  # it trained


def test_mesh_that_does_not_fit_the_devices_is_refused(pydoc_char_dir, tmp_path):
    c = tiny_config(pydoc_char_dir)
    c.mesh.data = 1
    c.mesh.fsdp = 2  # one device here: 1 x 2 cannot be made
    with pytest.raises(ValueError, match="data=1 x fsdp=2 = 2 but there are 1 devices"):
        trainer.train(c, tmp_path / "a")
