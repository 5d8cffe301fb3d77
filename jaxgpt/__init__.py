"""jaxgpt: GPT-2 in JAX/Flax, with every design choice that separates it from modern LLMs as a switch.

The entry points; each subpackage holds one concern: `nn` (the model), `decode` (generation and KV caches),
`data`, `train`, `io` (workdirs, checkpoints, Hugging Face), `eval`, with `lora` and `quantize` beside them.
Names that load JAX are imported on first use, so that configs import jaxgpt without JAX.
"""

from jaxgpt import _lazy
from jaxgpt.nn.config import GPTConfig, param_count

__all__ = ["DecodeOptions", "GPT", "GPTConfig", "Workdir", "generate", "init_params", "load_hf_gpt2",
           "load_model", "lora", "param_count", "quantize", "stream"]
__version__ = "0.1.0"
__getattr__ = _lazy.attributes(__name__, {
    "GPT": "jaxgpt.nn.model", "init_params": "jaxgpt.nn.model",
    "generate": "jaxgpt.decode.generation", "stream": "jaxgpt.decode.generation",
    "DecodeOptions": "jaxgpt.decode.options",
    "load_hf_gpt2": "jaxgpt.io.hf", "Workdir": "jaxgpt.io.workdir", "load_model": "jaxgpt.io.workdir",
    "lora": None, "quantize": None})
