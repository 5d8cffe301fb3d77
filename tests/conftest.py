"""Shared test fixtures: the test data folder ($JAXGPT_SHARED, default ../shared beside the repo), fresh random
params of a config (`from conftest import SHARED, random_params`), and XLA:CPU's fast-compile settings.

The suite compiles with XLA:CPU's backend optimisations off (`FAST_COMPILE`, set here before JAX starts, so
every test and every subprocess a test starts inherits it): its programs are tiny and run a few times, so
compiling dominates, and these settings compile several times faster. They change how XLA:CPU generates code,
not what a program computes; training, sampling and the benchmarks run with XLA's defaults."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXGPT_SHARED") or REPO.parent / "shared")  # test modules: `from conftest import SHARED`
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # a test's subprocess importing conftest has them
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()


def xla_env(devices: int | None = None, **extra: str) -> dict:
    """os.environ for a subprocess on CPU: FAST_COMPILE, and `devices` fake CPU devices when given."""
    flags = os.environ["XLA_FLAGS"]
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: put the test data folder beside the repository or set $JAXGPT_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_bpe_file(shared_dir: Path) -> Path:
    return shared_dir / "data" / "gpt2.tiktoken"


@pytest.fixture(scope="session")
def pydoc_char_dir(tmp_path_factory) -> Path:
    """The built-in corpus (CPython's pydoc topics) prepared with the char tokenizer, once per session (read only)."""
    from jaxgpt import data as data_lib

    d = tmp_path_factory.mktemp("pydoc") / "pydoc_char"
    data_lib.prepare(d, dataset="pydoc", tokenizer="char")
    return d


def random_params(cfg, seed: int = 0, std: float = 0.02, norm_scales: str = "normal"):
    """Params of `cfg` with every leaf drawn fresh in NumPy (no compile, unlike model.init): weights and biases
    ~ N(0, std); norm scales 1 + N(0, std) ("normal"), U(0.5, 1.5) ("uniform") or N(0, std) ("same")."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.nn.model import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        if is_scale and norm_scales == "uniform":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(s.dtype))
        offset = 1.0 if is_scale and norm_scales == "normal" else 0.0
        return jnp.asarray((offset + std * rng.standard_normal(s.shape)).astype(s.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def hf_tiny_gpt2(tmp_path_factory):
    """(model, cfg, params): a random 2-layer transformers GPT-2 (vocab 97, n_embd 32, no dropout, every weight
    random) and the same weights loaded into jaxgpt through its save_pretrained folder. Shared: copy, never modify."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt.io.hf import load_hf_gpt2

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0/1: make every weight random
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(d)
    cfg, params = load_hf_gpt2(d)
    return model, cfg, params
