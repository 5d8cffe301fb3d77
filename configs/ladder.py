"""The ladder from GPT-2 to a modern LLM on nanoGPT's CPU recipe: one switch per rung, each rung keeping the ones
before it (experiments/ladder.py trains every rung over several seeds).

    python train.py --config=configs/ladder.py:gqa --config.data.input=../shared/data/tinyshakespeare.txt

The argument names the rung (default the top one, "muon"). Every rung is configs/shakespeare_char_cpu.py (4 layers
x 128, 4 heads, block 64, batch 12, 2000 iters, AdamW lr 1e-3 -> 1e-4, no biases as nanoGPT's Shakespeare config)
with q, k and v as three matrices (fused_qkv False: the same function as GPT-2's fused c_attn, and what lets Muon
orthogonalise q, k and v one by one, as modded-nanogpt does), plus the rungs up to the one named:

    gpt2     GPT-2's block: learned positions, LayerNorm, tanh-GELU MLP of 4C, tied head, AdamW
    rope     + rotary positions (theta 10000)
    rmsnorm  + RMSNorm
    swiglu   + SwiGLU MLP at Llama's width rule, 2 * 4C / 3 rounded up to a multiple of 32 (352 at C = 128)
    qk_norm  + RMSNorm on each head's q and k
    gqa      + grouped-query attention, n_head / 4 = 1 key/value head (a 4x smaller KV cache)
    untied   + an untied output head
    muon     + Muon on the blocks' matrices (AdamW stays on embeddings, head and norms)
"""

from configs import shakespeare_char_cpu
from jaxgpt.nn.config import llama_mlp_hidden

BASE = {"fused_qkv": False}  # every rung, GPT-2 included
RUNGS: tuple[tuple[str, dict], ...] = (
    ("gpt2", {}),
    ("rope", {"pos_embedding": "rope"}),
    ("rmsnorm", {"norm": "rmsnorm"}),
    ("swiglu", {"mlp": "swiglu", "mlp_hidden": llama_mlp_hidden(128, multiple_of=32)}),
    ("qk_norm", {"qk_norm": True}),
    ("gqa", {"n_kv_head": 1}),
    ("untied", {"tie_embeddings": False}),
    ("muon", {"optimizer": "muon"}),
)
TRAIN_KEYS = ("optimizer", "muon_lr", "muon_momentum", "muon_weight_decay")  # switches of the training config


def rung_names() -> tuple[str, ...]:
    return tuple(name for name, _ in RUNGS)


def switches(rung: str) -> tuple[dict, dict]:
    """(model fields, training-config keys) of a rung: BASE plus every rung's switches up to and including it."""
    if rung not in rung_names():
        raise ValueError(f"unknown ladder rung {rung!r}; use one of {', '.join(rung_names())}")
    model, train = dict(BASE), {}
    for name, changes in RUNGS:
        for k, v in changes.items():
            (train if k in TRAIN_KEYS else model)[k] = v
        if name == rung:
            return model, train
    raise AssertionError("unreachable")


def get_config(rung: str = "muon"):
    c = shakespeare_char_cpu.get_config()
    model, train = switches(rung)
    c.model.update(model)
    for k, v in train.items():
        c[k] = v
    return c
