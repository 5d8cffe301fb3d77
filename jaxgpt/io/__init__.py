"""Files: run checkpoints (`checkpoint`), Hugging Face GPT-2 import and export (`hf`), atomic writes
(`atomic`) and the workdir lock (`lock`)."""

from jaxgpt import _lazy

__all__ = ["export_hf_gpt2", "load_hf_gpt2", "load_run"]
__getattr__ = _lazy.attributes(__name__, {"export_hf_gpt2": "jaxgpt.io.hf", "load_hf_gpt2": "jaxgpt.io.hf",
                                          "load_run": "jaxgpt.io.checkpoint"})
