"""Tests for jaxgpt.sharding.

Meshes of several devices need XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported,
so those checks run this file as a script in a subprocess (`python tests/test_sharding.py mesh OUTDIR`) and the
test reads what it wrote. The reference is always the same training run on a single device.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import xla_env

from jaxgpt import sharding as sh
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params

CFG = GPTConfig.preset("tiny")  # V=97, block 32, 2 layers, 2 heads, C=16
BATCH, SEQ, STEPS, MIN_SIZE = 8, 16, 4, 100
LOSS_RTOL = 1e-5  # f32: sharded runs only reorder sums
PARAM_ATOL = 2e-5  # after STEPS AdamW steps at lr 1e-2; params are O(0.02..1)
MESHES = {"data2_fsdp4": (2, 4), "data8": (8, 1)}
TIMEOUT_S = 300  # generous: the subprocesses share the cores with whatever else runs

# The specs the rule must give the tiny model when fsdp is 4 or 8 (min_size=100), written out by hand:
# the largest dimension divisible by the fsdp size is split; leaves under 100 elements are replicated.
EXPECTED_FSDP_SPECS = {
    "wte/embedding": (None, "fsdp"),  # [97, 16]: 97 does not divide, so the smaller dim 16
    "wpe/embedding": ("fsdp",),  # [32, 16]
    "ln_f/scale": (), "ln_f/bias": (),
    **{f"h_{i}/{k}": v for i in range(2) for k, v in {
        "ln_1/scale": (), "ln_1/bias": (), "ln_2/scale": (), "ln_2/bias": (),
        "attn/c_attn/kernel": (None, "fsdp"), "attn/c_attn/bias": (),  # [16, 48]; bias [48] < 100
        "attn/c_proj/kernel": ("fsdp",), "attn/c_proj/bias": (),  # [16, 16]: tie -> first dim
        "mlp/c_fc/kernel": (None, "fsdp"), "mlp/c_fc/bias": (),  # [16, 64]
        "mlp/c_proj/kernel": ("fsdp",), "mlp/c_proj/bias": (),  # [64, 16]
    }.items()},
}


# ---------------------------------------------------------------------------------------------------------
# A few AdamW steps of the tiny model, on one device (mesh=None) or a mesh. Used by tests and workers.


def global_batches(steps: int = STEPS, batch: int = BATCH, seq: int = SEQ) -> list[dict[str, np.ndarray]]:
    """Rows are arithmetic progressions mod V (random start, stride 1..3): learnable in a few steps."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(steps):
        start = rng.integers(0, CFG.vocab_size, size=(batch, 1))
        stride = rng.integers(1, 4, size=(batch, 1))
        tok = ((start + stride * np.arange(seq + 1)) % CFG.vocab_size).astype(np.int32)  # [B, T + 1]
        out.append({"x": tok[:, :-1], "y": tok[:, 1:]})  # [B, T] each
    return out


def train(mesh: jax.sharding.Mesh | None, batches: list,
          min_size: int = MIN_SIZE) -> tuple[list, dict, dict, object]:
    """Run len(batches) AdamW steps; batches hold this process's rows.

    Returns (losses, initial params as numpy (this process's view; empty across hosts), params, opt_state).
    """
    model = GPT(CFG)
    tx = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        params = init_params(CFG, 0)
        opt_state = tx.init(params)
        step_fn, put = jax.jit(step), (lambda b: b)
    else:
        params, p_sh = sh.sharded_init(lambda key: init_params(CFG, key), mesh, jax.random.PRNGKey(0),
                                       min_size=min_size)
        opt_state, o_sh = sh.sharded_init(tx.init, mesh, params, min_size=min_size)
        step_fn = jax.jit(step, in_shardings=(p_sh, o_sh, sh.batch_sharding(mesh)),
                          out_shardings=(p_sh, o_sh, sh.replicated(mesh)), donate_argnums=(0, 1))
        put = lambda b: sh.shard_batch(b, mesh)  # noqa: E731
    init = _flat(params) if jax.process_count() == 1 else {}
    losses = []
    for b in batches:
        params, opt_state, loss = step_fn(params, opt_state, put(b))
        losses.append(float(loss))
    return losses, init, params, opt_state


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mu(opt_state):
    return opt_state[0].mu  # adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)


# ---------------------------------------------------------------------------------------------------------
# Workers (run as `python tests/test_sharding.py ...` with XLA_FLAGS already in the environment)


def worker_mesh(outdir: Path) -> None:
    """8 devices: the single-device run, then each mesh; params saved as npz, losses and specs as JSON."""
    assert jax.device_count() == 8, jax.devices()
    batches = global_batches()
    results = {}
    losses, ref_init, params, _ = train(None, batches)
    np.savez(outdir / "single.npz", **_flat(params))
    np.savez(outdir / "single_init.npz", **ref_init)
    results["single"] = {"losses": losses, "devices": [str(d) for d in params["wte"]["embedding"].devices()]}
    for name, (data, fsdp) in MESHES.items():
        mesh = sh.make_mesh(data, fsdp)
        losses, init, params, opt_state = train(mesh, batches)
        init_diff = max(float(np.max(np.abs(init[k] - ref_init[k]))) for k in ref_init)
        np.savez(outdir / f"{name}.npz", **_flat(params))
        results[name] = {
            "losses": losses, "init_max_abs_diff": init_diff,
            "param_specs": sh.spec_summary(params), "mu_specs": sh.spec_summary(_mu(opt_state)),
            "count_spec": list(opt_state[0].count.sharding.spec),
            "c_fc_shard_shape": list(params["h_0"]["mlp"]["c_fc"]["kernel"].addressable_shards[0].data.shape),
            "n_devices": len(params["h_0"]["mlp"]["c_fc"]["kernel"].sharding.device_set),
        }
    try:  # a batch that does not split over 8 devices must be refused with a clear message
        sh.shard_batch({"x": np.zeros((6, 4), np.int32)}, sh.make_mesh())
        results["bad_batch_error"] = None
    except ValueError as e:
        results["bad_batch_error"] = str(e)
    (outdir / "results.json").write_text(json.dumps(results))


def worker_multihost(outdir: Path) -> None:
    """One of two processes, 2 CPU devices each; coordinator and ids come from JAX_* environment variables."""
    assert sh.maybe_initialize_distributed() is True
    pid, n = jax.process_index(), jax.process_count()
    mesh = sh.make_mesh(data=2, fsdp=2)  # 4 devices over 2 processes
    rows = BATCH // n
    local = [{k: v[pid * rows:(pid + 1) * rows] for k, v in b.items()} for b in global_batches()]
    losses, _, params, _ = train(mesh, local)
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(params, tiled=True)
    if pid == 0:
        np.savez(outdir / "multihost.npz", **_flat(full))
    (outdir / f"multihost_{pid}.json").write_text(json.dumps({
        "losses": losses, "process_count": n, "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(), "param_specs": sh.spec_summary(params)}))


# The compiled FSDP steps must keep activations split over the batch: attention scores [B/8, H, T, T] on each
# of 8 devices, never the whole batch B with the heads split. Shapes chosen so no other array ends in T, T; one
# block shows it (every block pins the same way) and compiles in half the time of two.
ACT_CFG = GPTConfig(vocab_size=96, block_size=24, n_layer=1, n_head=8, n_embd=64)
ACT_BATCH = 16


def worker_activations(outdir: Path) -> None:
    """Compile the real train and eval steps for a 1 x 8 FSDP mesh; record every [..., T, T] shape in the HLO."""
    from jaxgpt.train import steps as step_lib
    from jaxgpt.train.config import MeshConfig, OptimConfig
    from jaxgpt.train.config import base_config
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.min_shard_size = 1, 8, 256
    mesh, shardings_fn = step_lib.mesh_shardings_fn(MeshConfig.of(c.mesh), ACT_BATCH)
    tx = step_lib.make_optimizer(OptimConfig.of(c))
    state = jax.eval_shape(lambda: step_lib.init_state(init_params(ACT_CFG, 0), tx))
    s = shardings_fn(state, None)
    step = step_lib.make_train_step(ACT_CFG, tx, shardings=s)
    abstract = lambda tree, sharding: jax.tree.map(  # noqa: E731
        lambda x, sd: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sd), tree, sharding)
    batch = jax.ShapeDtypeStruct((1, ACT_BATCH, ACT_CFG.block_size), jnp.int32, sharding=s.batch)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=s.rng)
    T = ACT_CFG.block_size
    rows = jax.ShapeDtypeStruct((ACT_BATCH, T), jnp.int32)  # the eval step gets host arrays: no sharding given
    with sh.activation_mesh(mesh):
        hlo = step.lower(abstract(state, s.state), (batch, batch), rng, None).compile().as_text()
        hlo_eval = step_lib.make_eval_step(ACT_CFG).lower(abstract(state.params, s.state.params), rows,
                                                          rows).compile().as_text()
    scores = {name: sorted({m for m in re.findall(rf"\[([\d,]+),{T},{T}\]", text)})
              for name, text in (("train", hlo), ("eval", hlo_eval))}
    (outdir / "activations.json").write_text(json.dumps({"scores": scores, "n_devices": jax.device_count()}))


# ---------------------------------------------------------------------------------------------------------
# Subprocess helpers


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(XLA_FLAGS=xla_env(devices)["XLA_FLAGS"], JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str]]]:
    """Start the 8-device worker and both processes of the two-host run together (they use separate cores)."""
    out = tmp_path_factory.mktemp("workers")
    port = _free_port()
    jobs = {"mesh": ([sys.executable, __file__, "mesh", str(out)], _env(8))}
    for i in range(2):
        jobs[f"host{i}"] = ([sys.executable, __file__, "multihost", str(out)],
                            _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                 JAX_PROCESS_ID=str(i)))
    procs, logs = {}, {}
    try:
        for name, (cmd, env) in jobs.items():
            logs[name] = (out / f"{name}.log").open("w")
            procs[name] = subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        codes = {name: p.wait(timeout=TIMEOUT_S) for name, p in procs.items()}
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.kill()
            logs[name].close()
    return out, {name: (codes[name], (out / f"{name}.log").read_text()[-4000:]) for name in jobs}


@pytest.fixture(scope="module")
def mesh_results(workers) -> tuple[dict, Path]:
    out, status = workers
    code, log = status["mesh"]
    assert code == 0, log
    return json.loads((out / "results.json").read_text()), out


# ---------------------------------------------------------------------------------------------------------
# Tests: 8 fake devices


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_losses_and_params_match_single_device(mesh_results, name):
    results, out = mesh_results
    single, got = results["single"], results[name]
    assert len(single["devices"]) == 1
    assert got["n_devices"] == 8
    assert got["init_max_abs_diff"] == 0.0  # sharded init draws the same numbers
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=LOSS_RTOL)
    assert single["losses"][-1] < single["losses"][0] - 0.05  # the steps really train
    ref, params = dict(np.load(out / "single.npz")), dict(np.load(out / f"{name}.npz"))
    assert sorted(ref) == sorted(params)
    init = dict(np.load(out / "single_init.npz"))
    moved = max(np.max(np.abs(params[k] - init[k])) for k in init)
    assert moved > 100 * PARAM_ATOL  # parameters moved far more than the tolerance
    chex.assert_trees_all_close(params, ref, atol=PARAM_ATOL, rtol=0)


def test_fsdp_param_and_optimizer_specs(mesh_results):
    results, _ = mesh_results
    got = results["data2_fsdp4"]
    assert {k: tuple(v) for k, v in got["param_specs"].items()} == EXPECTED_FSDP_SPECS
    assert {k: tuple(v) for k, v in got["mu_specs"].items()} == EXPECTED_FSDP_SPECS  # Adam moments follow
    assert got["count_spec"] == []
    fsdp = MESHES["data2_fsdp4"][1]
    chex.assert_shape(np.zeros(results["data2_fsdp4"]["c_fc_shard_shape"]), (16, 64 // fsdp))


def test_data_parallel_mesh_replicates_params(mesh_results):
    results, _ = mesh_results
    got = results["data8"]
    assert all(tuple(v) == () for v in got["param_specs"].values())
    assert all(tuple(v) == () for v in got["mu_specs"].values())
    assert got["c_fc_shard_shape"] == [16, 64]


def test_shard_batch_rejects_indivisible_batch(mesh_results):
    msg = mesh_results[0]["bad_batch_error"]
    assert msg is not None and "(6, 4)" in msg and "multiple of 8" in msg


def test_fsdp_activations_stay_split_over_the_batch(tmp_path):
    """The compiled 1 x 8 FSDP train and eval steps hold attention scores [B/8, H, T, T] on a device, never the
    whole batch [B, H/k, T, T] (the eval step, given unsharded rows, did before activations were pinned)."""
    env = _env(8)
    proc = subprocess.run([sys.executable, __file__, "activations", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "activations.json").read_text())
    assert got["n_devices"] == 8
    per_device = f"{ACT_BATCH // 8},{ACT_CFG.n_head}"
    for step in ("train", "eval"):
        shapes = got["scores"][step]
        assert per_device in shapes, (step, shapes)
        assert all(str(ACT_BATCH) not in shape.split(",") for shape in shapes), (step, shapes)  # no whole batch


# ---------------------------------------------------------------------------------------------------------
# Tests: two processes (multi-host on one machine, gloo collectives)


def test_two_processes_match_single_device(workers, mesh_results):
    out, status = workers
    for name in ("host0", "host1"):
        assert status[name][0] == 0, status[name][1]
    ref_losses = mesh_results[0]["single"]["losses"]  # the single-device run of the same steps
    ref_params = dict(np.load(mesh_results[1] / "single.npz"))
    for i in range(2):
        got = json.loads((out / f"multihost_{i}.json").read_text())
        assert (got["process_count"], got["device_count"], got["local_device_count"]) == (2, 4, 2)
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=LOSS_RTOL)
        assert {k: tuple(v) for k, v in got["param_specs"].items()} == EXPECTED_FSDP_SPECS  # fsdp=2
    chex.assert_trees_all_close(dict(np.load(out / "multihost.npz")), ref_params, atol=PARAM_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Tests: pure helpers, in this process (one device)


@pytest.mark.parametrize("shape,fsdp,min_size,expected", [
    ((768, 2304), 4, 1, (None, "fsdp")),  # c_attn: the larger dim
    ((3072, 768), 4, 1, ("fsdp",)),  # mlp c_proj
    ((768, 768), 4, 1, ("fsdp",)),  # tie: the first dim
    ((50257, 768), 4, 1, (None, "fsdp")),  # vocab 50257 is odd: the next largest dim that divides
    ((50304, 768), 8, 1, ("fsdp",)),  # padded vocab divides
    ((7, 9), 4, 1, ()),  # nothing divides: replicated
    ((2304,), 4, 2**14, ()),  # small: replicated
    ((2304,), 4, 1, ("fsdp",)),
    ((768, 2304), 1, 1, ()),  # no fsdp axis
    ((), 4, 0, ()),  # scalars
    ((12, 4, 768, 64), 8, 1, (None, None, "fsdp")),
])
def test_partition_spec(shape, fsdp, min_size, expected):
    assert tuple(sh.partition_spec(shape, fsdp, min_size)) == expected


def test_tree_shardings_on_abstract_train_state():
    mesh = sh.make_mesh()
    abstract = jax.eval_shape(lambda: optax.adamw(1e-3).init(init_params(CFG, 0)))
    shardings = sh.opt_state_shardings(abstract, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(shardings))
    assert sh.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert sh.batch_sharding(mesh, batch_dim=1).spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


def test_stacked_block_leaves_keep_each_layer_s_spec():
    """A stacked train state ([L, ...] block leaves, jaxgpt.nn.stacking) is split like the unrolled one, layer by
    layer: the layer axis is never split, whatever its size."""
    from jaxgpt.nn import stacking as layers

    mesh = jax.sharding.AbstractMesh((2, 4), sh.AXES)
    cfg = CFG.replace(n_layer=32)  # [32, 16] biases: the layer axis is the largest, divides, and stays whole
    abstract = jax.eval_shape(lambda: optax.adamw(1e-3).init(init_params(cfg, 0)))
    unrolled = sh.spec_summary(sh.tree_shardings(abstract, mesh, MIN_SIZE // 4))
    stacked = sh.spec_summary(sh.tree_shardings(jax.eval_shape(layers.stack_tree, abstract), mesh, MIN_SIZE // 4))
    assert any("fsdp" in spec for spec in unrolled.values())
    for path, spec in stacked.items():
        key = f"/{path}"
        want = (None, *unrolled[key.replace("/h/", "/h_0/", 1)[1:]]) if "/h/" in key else unrolled[path]
        assert spec == want, path
    assert stacked["0/mu/h/attn/c_proj/bias"] == (None,)  # 16 a layer: replicated, as unrolled


def test_shard_batch_and_params_single_device():
    mesh = sh.make_mesh()
    batch = global_batches(1)[0]
    out = sh.shard_batch(batch, mesh)
    chex.assert_shape(out["x"], (BATCH, SEQ))
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    stacked = sh.shard_batch(np.stack([batch["x"], batch["y"]]), mesh, batch_dim=1)  # [A, B, T]
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match="along dim 2"):
        sh.shard_batch(np.zeros((2, 3)), mesh, batch_dim=2)
    params = init_params(CFG, 3)
    placed = sh.shard_params(params, sh.param_shardings(params, mesh))
    chex.assert_trees_all_equal(placed, params)


def test_make_mesh_errors():
    assert dict(sh.make_mesh().shape) == {"data": jax.device_count(), "fsdp": 1}
    assert dict(sh.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": jax.device_count()}
    n = jax.device_count()
    with pytest.raises(ValueError, match="both -1"):
        sh.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="device count"):
        sh.make_mesh(n + 1, 1)
    with pytest.raises(ValueError, match="positive integer"):
        sh.make_mesh(0, 1)
    with pytest.raises(ValueError, match="empty device list"):
        sh.make_mesh(devices=[])


@pytest.mark.parametrize("args,env,expected", [
    ((None, None, None), {}, None),
    (("10.0.0.1:1234", 4, 2), {}, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    (("10.0.0.1:1234", 1, 0), {}, None),  # one process: nothing to initialize
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1}),
    ((None, None, None), {"JAXGPT_DISTRIBUTED": "1"}, {}),
    ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
    ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ((None, None, None), {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, {}),
])
def test_distributed_args(args, env, expected):
    assert sh.distributed_args(*args, environ=env) == expected


@pytest.mark.parametrize("args,env,match", [
    (("10.0.0.1:1234", None, None), {}, "missing num_processes, process_id"),
    (("10.0.0.1:1234", 2, 2), {}, "process_id=2 is not valid"),
    (("10.0.0.1", 2, 0), {}, "no port"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:9"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
])
def test_distributed_args_errors(args, env, match):
    with pytest.raises(ValueError, match=match):
        sh.distributed_args(*args, environ=env)


def test_maybe_initialize_distributed_single_process_is_noop():
    assert sh.maybe_initialize_distributed(environ={}) is False
    assert not jax.distributed.is_initialized()
    chex.assert_trees_all_close(jnp.ones(3).sum(), 3.0)  # the backend still works


if __name__ == "__main__":
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    {"mesh": worker_mesh, "multihost": worker_multihost, "activations": worker_activations}[mode](outdir)
