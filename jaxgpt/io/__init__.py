"""Files: a run's directory (`Workdir`, every file named once, local or in a bucket through `paths`; `load_model`
reads a run or a Hugging Face folder back), run checkpoints (`checkpoint`), Hugging Face import and export
(`hf`: `load_hf` / `export_hf` choose GPT-2, Llama, Qwen2 or Qwen3 by `model_type`; the Llama-like families in
`hf_families`), atomic writes (`atomic`) and the workdir lock (`lock`, local or on a bucket)."""

from jaxgpt import _lazy
from jaxgpt.io.workdir import Workdir

__all__ = ["Workdir", "export_hf", "export_hf_gpt2", "load_hf", "load_hf_gpt2", "load_model"]
__getattr__ = _lazy.attributes(__name__, {"export_hf": "jaxgpt.io.hf", "export_hf_gpt2": "jaxgpt.io.hf",
                                          "load_hf": "jaxgpt.io.hf", "load_hf_gpt2": "jaxgpt.io.hf",
                                          "load_model": "jaxgpt.io.workdir"})
