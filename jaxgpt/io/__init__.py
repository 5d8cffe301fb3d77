"""Files: a run's directory (`Workdir`, every file named once; `load_model` reads a run or a Hugging Face
GPT-2 back), run checkpoints (`checkpoint`), Hugging Face GPT-2 import and export (`hf`), atomic writes
(`atomic`) and the workdir lock (`lock`)."""

from jaxgpt import _lazy
from jaxgpt.io.workdir import Workdir

__all__ = ["Workdir", "export_hf_gpt2", "load_hf_gpt2", "load_model"]
__getattr__ = _lazy.attributes(__name__, {"export_hf_gpt2": "jaxgpt.io.hf", "load_hf_gpt2": "jaxgpt.io.hf",
                                          "load_model": "jaxgpt.io.workdir"})
