"""jaxgpt.io.checkpoint: a pytree saved with orbax restores leaf for leaf; an existing folder is never overwritten and
a missing one is a clear error."""

import jax
import numpy as np
import pytest

from jaxgpt import GPTConfig, init_params
from jaxgpt.io.checkpoint import restore_pytree, save_pytree


def test_orbax_pytree_roundtrip(tmp_path):
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, 7)
    save_pytree(tmp_path / "ck", params)
    jax.tree.map(np.testing.assert_array_equal, params, restore_pytree(tmp_path / "ck", params))
    with pytest.raises(FileExistsError, match="already exists"):
        save_pytree(tmp_path / "ck", params)  # never overwrite silently
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_pytree(tmp_path / "nope", params)
