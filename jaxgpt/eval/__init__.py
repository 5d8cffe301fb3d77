"""Evaluation people compare on: HellaSwag, lm-evaluation-harness tasks, and sliding-window perplexity.

    python -m jaxgpt.eval hellaswag --init-from gpt2
    python -m jaxgpt.eval lm-eval --init-from runs/gpt2 --tasks lambada_openai,arc_easy
    python -m jaxgpt.eval perplexity --init-from gpt2 --file text.txt --stride 512

`scoring` is the batched log-likelihood engine the three share; `hellaswag`, `perplexity` and
`lm_eval_model` (needs the `lm-eval` package) build on it; `__main__` is the command.
"""
