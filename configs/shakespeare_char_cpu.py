"""nanoGPT's CPU recipe on Tiny Shakespeare characters (its README: val loss about 1.88 after 2000 iters).

    python train.py --config=configs/shakespeare_char_cpu.py --config.data.input=../shared/data/tinyshakespeare.txt

It is configs/shakespeare_char.py with nanoGPT's command-line changes: --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20.
"""

from configs import shakespeare_char


def get_config():
    c = shakespeare_char.get_config()
    c.model.update(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
    c.batch_size = 12
    c.max_iters = 2000
    c.lr_decay_iters = 2000
    c.eval_iters = 20
    c.eval_at_start = True  # nanoGPT evaluates at iteration 0 as well
    c.log_interval = 1
    return c
