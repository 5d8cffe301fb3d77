"""`python -m jaxgpt.eval {hellaswag,lm-eval,perplexity} --init-from RUN_DIR|HF_NAME|HF_DIR [options]`
(RUN_DIR and HF_DIR may be gs:// URLs).

Every command loads the model like `jaxgpt.sample` (a training workdir, a Hugging Face GPT-2 directory or
name, plus optional --adapters and --quantize), prints its result as one JSON object on stdout and, with
--output, also writes it to a file (atomically: a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from jaxgpt.data.tokenizer import BPE_ENV
from jaxgpt.io import atomic
from jaxgpt.io.paths import MissingBackend


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-from", required=True,
                   help="Hugging Face GPT-2 directory or name (gpt2, gpt2-xl, ...), or a jaxgpt training workdir")
    p.add_argument("--adapters", default=None, help="LoRA/RsLoRA adapters folder, merged into the base")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"), help="weight quantization")
    p.add_argument("--bpe-file", default=None, help=f"local gpt2.tiktoken for offline GPT-2 BPE (else ${BPE_ENV})")
    p.add_argument("--batch-size", type=int, default=None, help="examples (hellaswag), rows (lm-eval) or windows "
                                                                 "(perplexity) per jitted call")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.eval", description="HellaSwag, lm-eval tasks, perplexity")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hellaswag", help="completion-style HellaSwag accuracy (acc, acc_norm)")
    _common(h)
    h.add_argument("--data", default=None, help="local HellaSwag jsonl (default: the official val set, downloaded "
                                                "once into $JAXGPT_CACHE_DIR or ~/.cache/jaxgpt)")
    h.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    e = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks with the jaxgpt model")
    _common(e)
    e.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    e.add_argument("--only-include-path", action="store_true",
                   help="index only the tasks of --include-path (skips lm-eval's thousands of built-in YAMLs)")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    e.add_argument("--max-gen-toks", type=int, default=256)
    x = sub.add_parser("perplexity", help="sliding-window perplexity of a UTF-8 text file")
    _common(x)
    x.add_argument("--file", required=True, help="UTF-8 text file")
    x.add_argument("--max-length", type=int, default=None, help="window length (default: the model's block)")
    x.add_argument("--stride", type=int, default=None, help="tokens between windows (default: half the window)")
    return p


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from jaxgpt.io.workdir import load_model, transform_params

    model_cfg, params, tokenizer = load_model(args.init_from, args.bpe_file)
    return model_cfg, transform_params(params, args.adapters, args.quantize), tokenizer


def run_hellaswag(args: argparse.Namespace) -> dict[str, Any]:
    from jaxgpt.eval import hellaswag

    examples = hellaswag.load_examples(args.data, args.limit)
    model_cfg, params, tokenizer = _load(args)
    res = hellaswag.evaluate(params, model_cfg, examples, tokenizer, batch_size=args.batch_size or 8, progress=True)
    if res["truncated"]:
        print(f"{res['truncated']} of {res['n']} examples were longer than the model's block of "
              f"{model_cfg.block_size} tokens; their contexts lost tokens on the left", file=sys.stderr)
    return res


def run_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    from jaxgpt.eval.perplexity import perplexity

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"--file {path} does not exist; pass a UTF-8 text file")
    model_cfg, params, tokenizer = _load(args)
    tokens = tokenizer.encode(path.read_text(encoding="utf-8"))
    return perplexity(params, model_cfg, tokens, stride=args.stride, max_length=args.max_length,
                      batch_size=args.batch_size or 8, progress=True)


def run_lm_eval(args: argparse.Namespace) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxgpt.eval.lm_eval_model import JaxGPTLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.only_include_path and not args.include_path:
        raise ValueError("--only-include-path needs --include-path DIR (the folder of your task YAMLs)")
    manager = TaskManager(include_path=args.include_path, include_defaults=not args.only_include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if not tasks or unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown or [args.tasks]}; `lm_eval ls tasks` lists them "
                         "(add --include-path DIR for your own YAMLs)")
    model_cfg, params, tokenizer = _load(args)
    lm = JaxGPTLM(params=params, model_cfg=model_cfg, tokenizer=tokenizer, batch_size=args.batch_size or 16,
                  max_gen_toks=args.max_gen_toks)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=manager, log_samples=False)
    return {"results": out["results"], "n_samples": out.get("n-samples", {})}


COMMANDS = {"hellaswag": run_hellaswag, "lm-eval": run_lm_eval, "perplexity": run_perplexity}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} is not valid; use a positive integer")
        result = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, MissingBackend) as e:
        print(f"jaxgpt.eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.output:
        atomic.write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
