"""Muon (config.optimizer = "muon", jaxgpt.train.steps.make_optimizer): optax.contrib.muon's update of one matrix
against a float64 NumPy Newton-Schulz of the same coefficients, the combined optimizer leaf by leaf (Muon leaves
against that reference, every other leaf against pure AdamW), the stacked layout of a scanned model against the
unrolled one, the config's one-line refusals, and a short run that learns and resumes bitwise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_params

from jaxgpt.nn import stacking
from jaxgpt.nn.config import GPTConfig
from jaxgpt.train import config as train_config
from jaxgpt.train import metrics, steps

CFG = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
NS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic (a, b, c)
# float32 Newton-Schulz against float64: 5 steps of a polynomial of slope a = 3.4 at 0 amplify rounding. Measured
# max error (of the largest entry): 1.7e-6 on one matrix, 1.2e-5 over 3 steps of a whole model; a wrong coefficient,
# step count, momentum weight or shape scale is off by 1e-2 or more
NS_TOL = 5e-5


def _optim(**changes) -> SimpleNamespace:
    o = SimpleNamespace(learning_rate=3e-3, decay_lr=True, warmup_iters=2, lr_decay_iters=5, min_lr=3e-4,
                        weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, optimizer="muon",
                        muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.2)
    return SimpleNamespace(**{**vars(o), **changes})


def _lr(o: SimpleNamespace, t: int, peak: float) -> float:
    """nanoGPT's schedule at step t with peak `peak` (min_lr scaled with it)."""
    floor = o.min_lr * peak / o.learning_rate
    if t < o.warmup_iters:
        return peak * (t + 1) / (o.warmup_iters + 1)
    ratio = min((t - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters), 1.0)
    return floor + 0.5 * (1 + np.cos(np.pi * ratio)) * (peak - floor)


def newton_schulz64(g: np.ndarray, steps_: int = 5, coeffs=NS, eps: float = 1e-8) -> np.ndarray:
    """Keller Jordan's zeropower_via_newtonschulz5 in float64: X = G / |G|_F, then X <- aX + (bA + cA^2)X with
    A = X X^T, on the wide orientation."""
    a, b, c = coeffs
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps_):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


class Muon64:
    """Muon on one matrix [in, out] in float64: Nesterov momentum with optax's bias correction, Newton-Schulz,
    sqrt(max(1, out/in)), decoupled weight decay, learning rate."""

    def __init__(self, beta: float):
        self.beta, self.mu, self.t = beta, 0.0, 0

    def direction(self, g: np.ndarray) -> np.ndarray:
        b, self.t = self.beta, self.t + 1
        g = np.asarray(g, np.float64)
        self.mu = b * self.mu + (1 - b) * g
        nesterov = b * self.mu / (1 - b ** (self.t + 1)) + (1 - b) * g / (1 - b ** self.t)
        return newton_schulz64(nesterov) * max(1.0, g.shape[1] / g.shape[0]) ** 0.5


def _close(got, want, tol: float, what: str = "") -> None:
    """|got - want| <= tol * max|want| elementwise (a tolerance relative to the matrix's scale)."""
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err <= tol, f"{what}: max error {err:.2e} of the largest entry > {tol:.0e}"


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_optax_muon_on_one_matrix_is_a_float64_newton_schulz_of_nesterov_momentum(shape):
    rng = np.random.default_rng(shape[0])
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    tx = optax.contrib.muon(learning_rate=0.03, beta=0.9)
    state, ref = tx.init({"w": w}), Muon64(0.9)
    for _ in range(3):
        g = rng.standard_normal(shape).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, {"w": w})
        _close(updates["w"], -0.03 * ref.direction(g), NS_TOL, str(shape))


def test_newton_schulz_leaves_singular_values_near_one():
    """What the iteration is for (not the identity, not a rescale): singular values of a badly conditioned matrix
    end in about [0.68, 1.13], the quintic's known band, while they spanned 100x before (5 steps lift a singular
    value of about 1/300 of the Frobenius norm into the band, not much smaller ones)."""
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 24)))
    g = (u * np.geomspace(1.0, 1e-2, 24)) @ v.T  # [24, 40]
    s = np.linalg.svd(newton_schulz64(g), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.2


def test_hidden_matrices_are_the_block_kernels_only():
    z = np.zeros
    params = {"wte": {"embedding": z((5, 4))}, "wpe": {"embedding": z((3, 4))}, "lm_head": {"kernel": z((4, 5))},
              "ln_f": {"scale": z(4)},
              "h_0": {"attn": {"c_q": {"kernel": z((4, 4)), "bias": z(4)}, "c_k": {"kernel": z((4, 2))},
                               "c_v": {"kernel": z((4, 2))}, "c_proj": {"kernel": z((4, 4))},
                               "q_norm": {"scale": z(2)}},
                      "mlp": {"c_gate": {"kernel": z((4, 8))}, "c_fc": {"kernel": z((4, 8))},
                              "c_proj": {"kernel": z((8, 4))}}, "ln_1": {"scale": z(4)}},
              "h": {"attn": {"c_attn": {"kernel": z((3, 4, 12)), "bias": z((3, 12))}}, "ln_2": {"scale": z((3, 4))}}}
    labels = steps.muon_labels(params)
    muon = sorted(jax.tree_util.keystr(p) for p, lab in jax.tree_util.tree_leaves_with_path(labels) if lab == "muon")
    assert muon == sorted([f"['h_0']['{m}']['{n}']['kernel']" for m, n in (
        ("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_gate"), ("mlp", "c_fc"),
        ("mlp", "c_proj"))] + ["['h']['attn']['c_attn']['kernel']"])
    with pytest.raises(ValueError, match="found no 2-D hidden matrix .* use config.optimizer='adamw'"):
        steps.muon_labels({"wte": {"embedding": z((5, 4))}, "h_0": {"ln_1": {"scale": z(4)}}})


def _grads(params, rng, scales=(3.0, 0.2, 1.0)):
    """Fresh random gradients of global norm about `scale` each."""
    n = sum(x.size for x in jax.tree.leaves(params))
    return [jax.tree.map(lambda p, s=s: jnp.asarray(s * rng.standard_normal(p.shape) / n ** 0.5, p.dtype), params)
            for s in scales]


def test_combined_optimizer_is_muon_on_hidden_matrices_and_adamw_on_the_rest():
    o = _optim()
    params = random_params(CFG.replace(n_layer=1), seed=1)
    grads_seq = _grads(params, np.random.default_rng(2))  # global norms ~3, 0.2, 1: clipped and not
    runs = {}
    for name in ("adamw", "muon"):
        tx = steps.make_optimizer(SimpleNamespace(**{**vars(o), "optimizer": name}))
        p, state, update = params, tx.init(params), jax.jit(tx.update)
        for g in grads_seq:
            updates, state = update(g, state, p)
            p = optax.apply_updates(p, updates)
        runs[name] = p
    labels = steps.muon_labels(params)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    assert sum(lab == "muon" for _, lab in flat) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    norms = [np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(g)))
             for g in grads_seq]
    assert norms[0] > o.grad_clip > norms[1]
    for path, label in flat:
        get = (lambda tree, path=path: np.asarray(
            jax.tree_util.tree_leaves_with_path(tree)[[q for q, _ in flat].index(path)][1]))
        key = jax.tree_util.keystr(path)
        if label == "adamw":  # exactly pure AdamW's trajectory: the leaf never sees Muon
            np.testing.assert_array_equal(get(runs["muon"]), get(runs["adamw"]), err_msg=key)
            continue
        ref, w = Muon64(o.muon_momentum), np.asarray(get(params), np.float64)
        for t, g in enumerate(grads_seq):
            g = np.asarray(get(g), np.float64) * min(1.0, o.grad_clip / norms[t])
            lr = _lr(o, t, o.muon_lr)
            w = w - lr * (ref.direction(g) + o.muon_weight_decay * w)
        _close(get(runs["muon"]) - get(params), w - get(params), NS_TOL, key)  # the change, not the weight


def test_stacked_blocks_get_muon_per_layer_as_unrolled_ones():
    """A scanned model's train state holds each block weight as one [L, in, out] leaf: Muon orthogonalises each
    layer's matrix on its own, as it does the unrolled h_0 ... h_{L-1}."""
    o = _optim()
    tx = steps.make_optimizer(o)
    params = random_params(CFG, seed=3)
    grads_seq = _grads(params, np.random.default_rng(4), scales=(0.5, 2.0))
    unrolled = (params, tx.init(params))
    stacked = (stacking.stack_layers(params), tx.init(stacking.stack_layers(params)))
    update = jax.jit(tx.update)  # compiled once per layout
    for g in grads_seq:
        u, s = update(g, unrolled[1], unrolled[0])
        unrolled = (optax.apply_updates(unrolled[0], u), s)
        u, s = update(stacking.stack_layers(g), stacked[1], stacked[0])
        stacked = (optax.apply_updates(stacked[0], u), s)
    want = stacking.stack_layers(unrolled[0])
    for (path, got), ref in zip(jax.tree_util.tree_leaves_with_path(stacked[0]), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    kernel = stacked[1][1].inner_states["muon"].inner_state[0].mu["h"]["mlp"]["c_fc"]["kernel"]
    assert kernel.shape == (CFG.n_layer, CFG.n_embd, 4 * CFG.n_embd)  # Muon's momentum is stacked too: it shards per layer


@pytest.mark.parametrize("change,message", [
    ({"optimizer": "sgd"}, "config.optimizer='sgd' is not valid; use one of adamw, muon"),
    ({"optimizer": "muon", "muon_lr": 0.0}, "config.muon_lr=0.0 is not valid; use a value > 0"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, r"config.muon_momentum=1.0 is not valid; use a value in \[0, 1\)"),
    ({"optimizer": "muon", "lora.rank": 4}, ("no 2-D hidden matrix to act on in a LoRA run .* use "
                                             "config.optimizer='adamw'")),
])
def test_bad_optimizer_settings_are_refused_in_one_line(change, message):
    c = train_config.base_config()
    for k, v in change.items():
        part, _, name = k.rpartition(".")
        (c[part] if part else c)[name] = v
    with pytest.raises(ValueError, match=message) as err:
        train_config.parts(c)
    assert "\n" not in str(err.value)


def test_the_default_optimizer_is_adamw_and_reaches_optim_config():
    c = train_config.base_config()
    assert train_config.parts(c).optim.optimizer == "adamw"
    c.optimizer, c.muon_lr = "muon", 0.03
    o = train_config.parts(c).optim
    assert (o.optimizer, o.muon_lr, o.muon_momentum, o.muon_weight_decay) == ("muon", 0.03, 0.95, 0.0)


# ---------------------------------------------------------------------------------------------------------
# On a mesh, and a whole run

# runs in a fresh interpreter with 4 CPU devices: the train program (build_program, as the trainer and jaxgpt.aot
# build it) of a scanned model with Muon, on data=1 x fsdp=4 and on one device
MESH_MUON = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jaxgpt import sharding as sh
from jaxgpt.nn.config import GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.train import steps
from jaxgpt.train.config import MeshConfig, OptimConfig, base_config
from jaxgpt.train.program import build_program

c = base_config()
c.optimizer, c.warmup_iters, c.lr_decay_iters = "muon", 1, 10
cfg = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=32, dropout=0.0, scan_layers=True)
rng = np.random.default_rng(0)
x, y = (jnp.asarray(rng.integers(0, 37, (1, 4, 8)), jnp.int32) for _ in range(2))
out = {}
for name, devices, fsdp in (("mesh", jax.devices(), 4), ("one", jax.devices()[:1], 1)):
    prog = build_program(cfg, OptimConfig.of(c), MeshConfig(data=1, fsdp=fsdp, min_shard_size=256), grad_accum=1,
                         batch_rows=4, devices=devices)
    state = jax.device_put(prog.layout.inward(steps.init_state(init_params(cfg, 0), prog.tx)), prog.shardings.state)
    losses = []
    for _ in range(3):
        state, m = prog.train_step(state, (x, y), jax.random.PRNGKey(0), None)
        losses.append(float(m["loss"]))
    out[name] = {"losses": losses, "params": [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)],
                 "specs": {k: [str(a) for a in v] for k, v in sh.spec_summary(prog.shardings.state).items()}}
print(json.dumps(out))
"""


@pytest.mark.run
def test_muon_state_shards_like_its_params_and_a_mesh_step_equals_one_device(tmp_path):
    import subprocess
    import sys

    from helpers import REPO, xla_env

    proc = subprocess.run([sys.executable, "-c", MESH_MUON], check=False, cwd=REPO, env=xla_env(4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    specs = out["mesh"]["specs"]
    momentum = {k: v for k, v in specs.items() if "/muon/" in k and "/mu/" in k}
    assert len(momentum) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj, each one stacked [L, in, out] leaf
    for key, spec in momentum.items():
        param = "params/" + key.split("/mu/", 1)[1]
        assert spec == specs[param], key  # Muon's momentum is placed as its matrix, layer axis unsplit
    assert specs["params/h/mlp/c_fc/kernel"][0] == "None" and "fsdp" in str(specs["params/h/mlp/c_fc/kernel"])
    np.testing.assert_allclose(out["mesh"]["losses"], out["one"]["losses"], rtol=1e-5)
    for a, b in zip(out["mesh"]["params"], out["one"]["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


@pytest.mark.run
def test_a_muon_run_learns_and_resumes_bitwise(pydoc_char_dir, tmp_path):
    from jaxgpt.io.workdir import Workdir
    from jaxgpt.train import trainer

    def config(max_iters: int):
        c = train_config.load_config_file(str(__import__("helpers").REPO / "configs" / "tiny.py"))
        c.data.dir = str(pydoc_char_dir)
        c.optimizer, c.muon_lr, c.learning_rate, c.min_lr = "muon", 0.05, 1e-2, 1e-3
        c.max_iters, c.lr_decay_iters, c.warmup_iters, c.eval_interval, c.ckpt_interval = max_iters, 16, 2, 8, 8
        c.eval_at_start, c.sample_tokens, c.tensorboard = True, 0, False
        return c

    trainer.train(config(16), tmp_path / "whole")
    trainer.train(config(8), tmp_path / "halves")
    trainer.train(config(16), tmp_path / "halves")  # resumes from step 8

    def read(name):
        records = metrics.read_metrics(tmp_path / name / "metrics.jsonl")
        return ({r["step"]: r["loss"] for r in records if r["kind"] == "train"},
                {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"},
                [r for r in records if r.get("event") == "resume"])

    (whole, whole_val, _), (halves, halves_val, resumes) = read("whole"), read("halves")
    assert [r["step"] for r in resumes] == [8]
    assert whole == halves and whole_val == halves_val  # bitwise: every loss after the resume as well
    assert whole_val[16] < whole_val[0] - 0.8, whole_val  # it learns: 1.23 nats in 16 steps measured
    (_, a, _), (_, b, _) = Workdir(tmp_path / "whole").load(), Workdir(tmp_path / "halves").load()
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert json.loads((tmp_path / "whole" / "train_config.json").read_text())["optimizer"] == "muon"
    adamw = config(20)
    adamw.optimizer = "adamw"
    with pytest.raises(ValueError, match="holds a run trained with config.optimizer='muon', not 'adamw'; resume it "
                                         "with --config.optimizer=muon, or start a new --workdir") as err:
        trainer.train(adamw, tmp_path / "whole")  # AdamW's state is another pytree: refused before restoring
    assert "\n" not in str(err.value)
