"""Data: the preparation CLI (`python -m jaxgpt.data`, `prepare`), small memmap corpora (`memmap`), streaming
corpora tokenized in parallel into llm.c shards (`streaming`, `shards`), the shard loader, and per-process
batches as a pure function of (seed, step) (`TrainBatches`)."""

from jaxgpt import _lazy
from jaxgpt.data.memmap import SPLITS, batch_rng, get_batch, load_meta, load_split
from jaxgpt.data.preparation import (DATASETS, SHARDED, TOKENIZERS, builtin_corpus, load_text, make_tokenizer, prepare,
                                    prepare_sharded, tokenizer_meta)

__all__ = ["DATASETS", "SHARDED", "SPLITS", "TOKENIZERS", "ShardLoader", "TrainBatches", "batch_rng",
           "builtin_corpus", "get_batch", "load_meta", "load_split", "load_text", "make_tokenizer", "prepare",
           "prepare_sharded", "tokenizer_meta"]
__getattr__ = _lazy.attributes(__name__, {"ShardLoader": "jaxgpt.data.shard_loader",
                                          "TrainBatches": "jaxgpt.data.batches"})
