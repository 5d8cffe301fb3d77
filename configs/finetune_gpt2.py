"""Fine-tune a pretrained GPT-2 (nanoGPT's config/finetune_shakespeare.py) on Tiny Shakespeare in GPT-2 BPE.

Start from a Hugging Face GPT-2 directory (config.json + model.safetensors) or Hub name (init_from="hf"), or
from a jaxgpt training workdir (init_from="run"). config.model may only change what a loaded model leaves
open: dropout, dtype, param_dtype, attention and a smaller block_size (0 / "" keep the loaded value).

    python train.py --config=configs/finetune_gpt2.py --config.init_path=/path/to/gpt2 \\
        --config.data.input=../shared/data/tinyshakespeare.txt --config.data.bpe_path=../shared/data/gpt2.tiktoken
"""

import ml_collections

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.init_from = "hf"  # "hf" (a Hugging Face GPT-2 directory or Hub name) or "run" (a jaxgpt workdir)
    c.init_path = "gpt2"
    c.model = ml_collections.ConfigDict(dict(dropout=0.0, block_size=0, dtype="", param_dtype="", attention=""))
    c.data.dataset = "shakespeare"
    c.data.tokenizer = "gpt2"
    c.data.dir = "data/shakespeare_gpt2"
    c.batch_size = 1
    c.grad_accum = 32
    c.max_iters = 20
    c.decay_lr = False  # constant learning rate
    c.learning_rate = 3e-5
    c.weight_decay = 0.1
    c.beta2 = 0.99
    c.eval_interval = 5
    c.ckpt_interval = 5
    c.eval_iters = 40
    c.log_interval = 1
    c.sample_tokens = 100
    return c
