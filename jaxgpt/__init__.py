"""jaxgpt: GPT-2 in JAX/Flax, with every design choice that separates it from modern LLMs as a switch."""

from jaxgpt.config import GPTConfig, param_count
from jaxgpt.model import GPT, init_params

__all__ = ["GPT", "GPTConfig", "init_params", "param_count"]
__version__ = "0.1.0"
