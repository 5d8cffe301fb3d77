"""The network: `GPTConfig` (every switch), `GPT` (linen), RoPE, dropout, the weight-leaf protocol (`weights`)
and the stacked layout of the blocks (`stacking`). GPT and init_params load JAX on first use."""

from jaxgpt import _lazy
from jaxgpt.nn.config import GPTConfig, param_count

__all__ = ["GPT", "GPTConfig", "count_params", "init_params", "param_count"]
__getattr__ = _lazy.attributes(__name__, {"GPT": "jaxgpt.nn.model", "init_params": "jaxgpt.nn.model",
                                          "count_params": "jaxgpt.nn.weights"})
