"""HellaSwag, completion style (llm.c / build-nanogpt): pick the ending the model finds most likely.

Each example is a context and 4 endings. Each ending is scored as a continuation of the context (the ending
is encoded with a leading space); `acc` takes the ending with the lowest summed loss, `acc_norm` the one
with the lowest mean loss per token. A context too long for the model loses tokens on the left (the
number of such examples is reported). The 4 endings share one context pass (`jaxgpt.eval.scoring`).

    examples = load_examples(None, limit=500)               # official val set, downloaded once
    evaluate(params, model_cfg, examples, tokenizer)        # {"acc", "acc_norm", "n", "truncated"}
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxgpt.data.tokenizer import Tokenizer, gpt2_tokenizer
from jaxgpt.eval.scoring import score
from jaxgpt.io import atomic
from jaxgpt.nn.config import GPTConfig

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_ENV = "JAXGPT_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxgpt") / "hellaswag"


def download_val(cache_dir: str | os.PathLike | None = None) -> Path:
    """The official validation jsonl, downloaded once into cache_dir (written to a temp name, then renamed)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    try:
        with atomic.file(path) as tmp:
            urllib.request.urlretrieve(VAL_URL, tmp)
    except OSError as e:
        raise RuntimeError(f"cannot download HellaSwag from {VAL_URL} ({e}); pass a local copy with --data FILE") from e
    return path


def _parse_line(line: str, where: str) -> dict[str, Any]:
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one HellaSwag example") from e
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise ValueError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) and e for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of 4 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise ValueError(f"{where}: 'label' must be an integer in 0..3, got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def load_examples(path: str | os.PathLike | None = None, limit: int | None = None,
                  cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Examples {ctx, endings, label} from a HellaSwag jsonl; None = the official val set (downloaded once)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is not valid; use a positive integer or None (all examples)")
    path = Path(path) if path is not None else download_val(cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} does not exist; pass a jsonl file or omit it to download")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{lineno}"))
    if not examples:
        raise ValueError(f"{path} holds no examples; pass a HellaSwag jsonl (one JSON object per line)")
    return examples


def render(example: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], list[list[int]]]:
    """Context tokens and the 4 ending tokens (each ending with a leading space, as the reference encodes it)."""
    return tokenizer.encode(example["ctx"]), [tokenizer.encode(" " + e) for e in example["endings"]]


def evaluate(params: Any, model_cfg: GPTConfig, examples: Sequence[dict[str, Any]], tokenizer: Tokenizer | None = None,
             *, batch_size: int = 8, progress: bool = False, details: bool = False) -> dict[str, Any]:
    """acc / acc_norm over examples; `batch_size` examples (4 rows each) per jitted call.

    Returns {"acc", "acc_norm", "n", "truncated"}; with details also per example "sum_loss" [n, 4],
    "avg_loss" [n, 4], "pred" and "pred_norm" [n]. tokenizer None = GPT-2 BPE.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive number of examples per call")
    if not examples:
        raise ValueError("no examples to evaluate; load some with load_examples")
    tokenizer = tokenizer or gpt2_tokenizer()
    requests = []
    for ex in examples:
        ctx, endings = render(ex, tokenizer)
        requests.extend((ctx, end) for end in endings)
    s = score(params, model_cfg, requests, batch_size=4 * batch_size, progress="hellaswag" if progress else False)
    sum_loss = -s.logprob.reshape(-1, 4)  # [n, 4]
    avg_loss = sum_loss / s.n_tokens.reshape(-1, 4)
    pred, pred_norm = sum_loss.argmin(axis=1), avg_loss.argmin(axis=1)
    labels = np.array([ex["label"] for ex in examples])
    out: dict[str, Any] = {"acc": float(np.mean(pred == labels)), "acc_norm": float(np.mean(pred_norm == labels)),
                           "n": len(examples), "truncated": int(s.truncated.reshape(-1, 4).any(axis=1).sum())}
    if details:
        out.update(sum_loss=sum_loss, avg_loss=avg_loss, pred=pred, pred_norm=pred_norm)
    return out


def label_loss(result: dict[str, Any], examples: Sequence[dict[str, Any]]) -> float:
    """The mean over examples of the correct ending's mean loss per token (`evaluate(..., details=True)`)."""
    labels = np.array([ex["label"] for ex in examples])  # [n]
    return float(np.mean(result["avg_loss"][np.arange(len(labels)), labels]))
