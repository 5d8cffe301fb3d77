"""Decoding: prefill and a `lax.scan` over new tokens with the KV cache as an explicit pytree (`generate`,
`stream`, `sample_text`), the sliding window past block_size, and the cache kinds (dense, int8, TurboQuant)."""

from jaxgpt import _lazy

__all__ = ["generate", "generate_uncached", "new_cache", "sample_text", "stream"]
__getattr__ = _lazy.attributes(__name__, {n: "jaxgpt.decode.generate" for n in __all__})
