"""A seconds-long smoke run (the tiny preset on the built-in corpus); the tests start from it."""

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.data.dataset = "pydoc"
    c.data.tokenizer = "char"
    c.model.update(n_layer=2, n_head=2, n_embd=16, block_size=32, dropout=0.0)
    c.batch_size = 4
    c.max_iters = 60
    c.warmup_iters = 10
    c.lr_decay_iters = 60
    c.eval_interval = 20
    c.ckpt_interval = 20
    c.eval_iters = 2
    c.log_interval = 1
    c.sample_tokens = 40
    c.progress = False
    return c
