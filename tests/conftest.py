"""Shared test fixtures: the test data folder ($JAXGPT_SHARED, default ../shared beside the repo)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXGPT_SHARED") or REPO.parent / "shared")  # test modules: `from conftest import SHARED`


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
