"""nanoGPT's CPU recipe on Tiny Shakespeare characters with a Qwen3-style block: configs/llama_style.py plus
QK-norm (RMSNorm on each head's q and k before RoPE) and rope_theta 1e6.

    python train.py --config=configs/qwen3_style.py --config.data.input=../shared/data/tinyshakespeare.txt
"""

from configs import shakespeare_char_cpu
from jaxgpt.nn.config import style_fields


def get_config():
    c = shakespeare_char_cpu.get_config()
    c.model.update(**style_fields("qwen3", c.model.n_embd, c.model.n_head))
    return c
