"""GPT-2 124M reproduction (nanoGPT's config/train_gpt2.py) on a prepared GPT-2 BPE token file.

~0.5M tokens a step: 12 sequences x 1024 tokens x 40 accumulation steps = 491,520 tokens; lr 6e-4 with 2000
warmup steps, cosine to 6e-5 over 600k steps, weight decay 0.1, beta2 0.95, bf16 compute with fp32 master
weights. Prepare the tokens first (any large text; nanoGPT uses OpenWebText):

    python -m jaxgpt.data --dataset text --input corpus.txt --tokenizer gpt2 --out data/openwebtext
    python train.py --config=configs/gpt2_124m.py
"""

from jaxgpt.train.config import base_config


def get_config():
    c = base_config()
    c.data.dataset = "text"
    c.data.tokenizer = "gpt2"
    c.data.dir = "data/openwebtext"
    # GPT-2 124M; the vocabulary padded from 50257 to 50304 (a multiple of 64) for faster matmuls
    c.model.update(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True)
    c.mixed_precision = True
    c.batch_size = 12
    c.grad_accum = 40
    c.max_iters = 600_000
    c.lr_decay_iters = 600_000
    c.learning_rate = 6e-4
    c.min_lr = 6e-5
    c.warmup_iters = 2000
    c.weight_decay = 0.1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0
    c.eval_interval = 1000
    c.ckpt_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.sample_tokens = 200
    return c
