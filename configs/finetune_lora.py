"""LoRA fine-tuning of a pretrained GPT-2 on Tiny Shakespeare in GPT-2 BPE: r=8, alpha=16 on attn/c_attn.

Only the adapters are trained and checkpointed (megabytes, not the model); the base comes from a Hugging Face
GPT-2 directory (init_from="hf") or a jaxgpt workdir (init_from="run"). At the end the adapters are saved to
<workdir>/lora and merged into a Hugging Face export in <workdir>/hf (config.lora.export_dir to change it).

    python train.py --config=configs/finetune_lora.py --config.init_path=/path/to/gpt2 \\
        --config.data.input=../shared/data/tinyshakespeare.txt --config.data.bpe_path=../shared/data/gpt2.tiktoken

RsLoRA (scale alpha / sqrt(r) instead of alpha / r): --config.lora.rank_stabilized=True. The LoRA paper's
choice of W_q and W_v only: --config.lora.targets="('attn/c_attn/q', 'attn/c_attn/v')". QLoRA (the frozen
base's block kernels in int8 or int4, float32 adapters; the export is dequantized):
--config.lora.base_quantize=int8. Adapters are applied in activation space (x @ W + s (x @ A) @ B, jaxgpt.lora.wrap).
"""

import ml_collections

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.init_from = "hf"  # "hf" (a Hugging Face GPT-2 directory or Hub name) or "run" (a jaxgpt workdir)
    c.init_path = "gpt2"
    c.model = ml_collections.ConfigDict(dict(dropout=0.0, block_size=0, dtype="", param_dtype="", attention=""))
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("attn/c_attn",)
    c.lora.rank_stabilized = False
    c.data.dataset = "shakespeare"
    c.data.tokenizer = "gpt2"
    c.data.dir = "data/shakespeare_gpt2"
    c.batch_size = 4
    c.grad_accum = 8
    c.max_iters = 200
    c.decay_lr = True
    c.learning_rate = 1e-3  # adapters start at zero and take a larger step size than full fine-tuning
    c.min_lr = 1e-4
    c.warmup_iters = 20
    c.lr_decay_iters = 200
    c.weight_decay = 0.0
    c.beta2 = 0.99
    c.eval_interval = 50
    c.ckpt_interval = 50
    c.eval_iters = 20
    c.log_interval = 5
    c.sample_tokens = 100
    return c
