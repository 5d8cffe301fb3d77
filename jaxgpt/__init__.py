"""jaxgpt: GPT-2 in JAX/Flax, with every design choice that separates it from modern LLMs as a switch."""

from typing import Any

from jaxgpt.config import GPTConfig, param_count

__all__ = ["GPT", "GPTConfig", "init_params", "param_count"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """GPT and init_params load the model (and JAX) on first use, so that configs import jaxgpt without JAX."""
    if name in ("GPT", "init_params"):
        from jaxgpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
