"""The embedded default: a small character-level GPT on the documentation text that ships with every CPython.

Needs no download and no accelerator: trains in a few minutes on a 2-core CPU and prints a sample.
"""

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.data.dataset = "pydoc"
    c.data.tokenizer = "char"
    c.model.update(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False)
    c.model.attention = "manual"  # einsum + softmax: the fastest training path on CPU
    c.batch_size = 16
    c.max_iters = 1000
    c.lr_decay_iters = 1000
    c.warmup_iters = 100
    c.learning_rate = 1e-3
    c.min_lr = 1e-4
    c.beta2 = 0.99
    c.eval_interval = 250
    c.ckpt_interval = 250
    c.eval_iters = 20
    c.sample_tokens = 500
    return c
