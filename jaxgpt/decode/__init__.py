"""Decoding: prefill and a `lax.scan` over new tokens with the KV cache as an explicit pytree (`generate`,
`stream`, `sample_text`), set by one `DecodeOptions`; the sliding window past block_size; and the cache kinds
(dense, int8, TurboQuant) that `new_cache` builds."""

from jaxgpt import _lazy

__all__ = ["DecodeOptions", "generate", "generate_uncached", "new_cache", "sample_text", "stream"]
__getattr__ = _lazy.attributes(__name__, {
    "DecodeOptions": "jaxgpt.decode.options", "new_cache": "jaxgpt.decode.cache_kinds",
    **{n: "jaxgpt.decode.generation" for n in ("generate", "generate_uncached", "sample_text", "stream")}})
