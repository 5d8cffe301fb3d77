"""Training: the train config (`config`, no JAX), optimizer and steps (`steps`), the run's setup (`run`), hooks,
metrics and writers, and the loop (`train`). `train` loads JAX on first use."""

from jaxgpt import _lazy

__all__ = ["train"]
__getattr__ = _lazy.attributes(__name__, {"train": "jaxgpt.train.trainer"})
