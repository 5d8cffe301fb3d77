"""nanoGPT's "baby GPT" on Tiny Shakespeare, characters (config/train_shakespeare_char.py).

6 layers, 6 heads, 384 wide, block 256, dropout 0.2, lr 1e-3 -> 1e-4 over 5000 iters, batch 64, beta2 0.99,
warmup 100. Offline: --config.data.input=path/to/tinyshakespeare.txt (otherwise it is downloaded once).
For nanoGPT's CPU recipe (4 layers, 128 wide, block 64, 2000 iters) use configs/shakespeare_char_cpu.py.
"""

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.data.dataset = "shakespeare"
    c.data.tokenizer = "char"
    c.data.dir = "data/shakespeare_char"
    c.model.update(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False)
    c.model.attention = "manual"  # einsum + softmax: attention dropout, and the fastest training path on CPU
    c.batch_size = 64
    c.grad_accum = 1
    c.max_iters = 5000
    c.lr_decay_iters = 5000
    c.learning_rate = 1e-3
    c.min_lr = 1e-4
    c.beta2 = 0.99
    c.warmup_iters = 100
    c.eval_interval = 250
    c.ckpt_interval = 250
    c.eval_iters = 200
    c.log_interval = 10
    return c
