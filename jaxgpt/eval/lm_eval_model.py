"""jaxgpt as an lm-evaluation-harness model, registered as "jaxgpt".

    import jaxgpt.eval.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="jaxgpt", model_args="init_from=gpt2,batch_size=16", tasks=["lambada_openai"])
    lm_eval.simple_evaluate(model=JaxGPTLM(params=params, model_cfg=model_cfg, tokenizer=tok), tasks=[...])

It tokenizes like lm-eval's `hf` model (context and continuation encoded together, then split; an empty
context becomes <|endoftext|>), truncates from the left the same way, and windows long documents with
lm-eval's own rolling-window helpers, so on the same weights both give the same log-likelihoods.
Scoring is batched by `jaxgpt.eval.scoring` (choices that share a context run it once);
`generate_until` decodes with the KV cache of `jaxgpt.decode.generation.generate`, one batch per set of
generation settings, and cuts the text at the first stop sequence.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.eval.scoring import score, window
from jaxgpt.nn.config import GPTConfig


def _positive_int(name: str, value: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1 or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; use a positive integer")
    return v


@register_model("jaxgpt")
class JaxGPTLM(TemplateLM):
    """A jaxgpt model for lm-eval: from `init_from` (run dir, Hugging Face name or dir; optional LoRA
    `adapters` and `quantize`), or from ready `params`, `model_cfg` and `tokenizer`."""

    def __init__(self, init_from: str | None = None, adapters: str | None = None, quantize: str = "none",
                 bpe_file: str | None = None, batch_size: int | str = 16, max_gen_toks: int = 256, seed: int = 0,
                 *, params: Any = None, model_cfg: GPTConfig | None = None, tokenizer: Tokenizer | None = None,
                 **unused: Any) -> None:
        super().__init__()
        if init_from is not None:
            from jaxgpt.io.workdir import load_model, transform_params

            model_cfg, params, tokenizer = load_model(str(init_from), bpe_file)
            params = transform_params(params, adapters, quantize)
        elif params is None or model_cfg is None or tokenizer is None:
            raise ValueError("pass init_from=RUN_DIR|HF_NAME|HF_DIR, or params, model_cfg and tokenizer together")
        if tokenizer.eot_id is None:
            raise ValueError(f"the {tokenizer.kind} tokenizer has no <|endoftext|>, which lm-eval needs as the "
                             "context of an empty prompt; evaluate a GPT-2 BPE model")
        if str(batch_size).startswith("auto"):
            batch_size = 16
        self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.seed = int(seed)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return window(self.model_cfg)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context tokens, continuation tokens)."""
        s = score(self.params, self.model_cfg, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
                  progress=False if disable_tqdm else "loglikelihood")
        out = [(float(lp), bool(g)) for lp, g in zip(s.logprob, s.greedy)]
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-likelihoods of whole documents, in lm-eval's disjoint rolling windows."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Decode each context until a stop sequence, <|endoftext|> or max_gen_toks."""
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for idx in by_kwargs.values():
                idx.sort(key=lambda i: -len(self.tok_encode(requests[i].args[0])))
                for j in range(0, len(idx), self.batch_size):
                    chunk = idx[j:j + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in chunk], dict(requests[chunk[0]].args[1]))
                    for i, text in zip(chunk, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        from jaxgpt.decode.generation import generate
        from jaxgpt.decode.options import DecodeOptions

        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(self.eot_token_id))
        n_new = int(kwargs.pop("max_gen_toks"))
        keep = self.max_length - n_new
        if keep < 1:
            raise ValueError(f"max_gen_toks={n_new} leaves no room for the context in the model's window of "
                             f"{self.max_length}; ask for fewer tokens")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        prompts = [self.tok_encode(c)[-keep:] or [self.eot_token_id] for c in contexts]
        options = DecodeOptions(temperature=temperature, top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                seed=self.seed, eos_id=self.eot_token_id)
        gen = generate(self.params, self.model_cfg, prompts, n_new, options)
        tokens, lengths = gen.tokens.tolist(), gen.lengths.tolist()
        texts = [self.tok_decode([t for t in row[:n] if t != self.eot_token_id]) for row, n in zip(tokens, lengths)]
        return [postprocess_generated_text(t, until, None) for t in texts]
