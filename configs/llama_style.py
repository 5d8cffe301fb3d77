"""nanoGPT's CPU recipe on Tiny Shakespeare characters with a Llama-style block (configs/shakespeare_char_cpu.py's
shape, data, optimizer and schedule), so a study compares the block alone:

    python train.py --config=configs/llama_style.py --config.data.input=../shared/data/tinyshakespeare.txt

RoPE, RMSNorm, no biases, a SwiGLU MLP at Llama's width (llama_mlp_hidden(128, 128) = 384), n_head / 4 = 1
key/value head (multi-query at 4 heads), an untied head and separate q/k/v projections
(`jaxgpt.nn.config.style_fields("llama", ...)`; GPTConfig.preset("gpt2", style="llama") is the 124M shape).
"""

from configs import shakespeare_char_cpu
from jaxgpt.nn.config import style_fields


def get_config():
    c = shakespeare_char_cpu.get_config()
    c.model.update(**style_fields("llama", c.model.n_embd, c.model.n_head))
    return c
