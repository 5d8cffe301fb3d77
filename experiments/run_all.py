"""Reproduce every figure of docs/design.md: each study in turn, as its own `python -m experiments.<name>`.

    python -m experiments.run_all                  # CPU sizes, one study after the other
    python -m experiments.run_all --full           # the accelerator sizes (each study's --full)
    python -m experiments.run_all --only positions --only weight_tying
    python -m experiments.run_all --list           # what would run

Studies run one at a time in their own process (a small machine stays usable, and one study's memory is
freed before the next starts). Finished training runs are reused by the studies that cache them, so an
interrupted run_all can simply be started again. The exit status is non-zero when a study failed; the
others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Sequence

from experiments.common import REPO

# (module, what it reproduces); studies owned elsewhere are run when their module exists
STUDIES: tuple[tuple[str, str], ...] = (
    ("kv_cache_flops", "docs/figures/kvflops_*"),
    ("weight_tying", "docs/figures/tying_*"),
    ("positions", "docs/figures/positions_*"),
    ("norm_placement", "docs/figures/norm_*"),
    ("lora_rank", "docs/figures/lora_*"),
    ("quantize_layernorm", "docs/figures/quant_layernorm*"),
    ("kv_compression", "docs/figures/kv_compression*"),
    ("ladder", "docs/figures/ladder*"),
)


def available(only: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The studies whose module exists (restricted to `only` when given)."""
    known = {name for name, _ in STUDIES}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ValueError(f"unknown studies {unknown}; use some of {', '.join(sorted(known))}")
    return [(n, what) for n, what in STUDIES
            if (REPO / "experiments" / f"{n}.py").is_file() and (not only or n in only)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="pass --full to every study (accelerator sizes)")
    ap.add_argument("--only", action="append", default=[], help="run only this study (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the studies and exit")
    a = ap.parse_args(argv)
    studies = available(a.only)
    if a.list:
        for name, what in studies:
            print(f"python -m experiments.{name}{' --full' if a.full else ''}    -> {what}")
        return 0
    failed = []
    for name, what in studies:
        cmd = [sys.executable, "-m", f"experiments.{name}"] + (["--full"] if a.full else [])
        print(f"=== {' '.join(cmd[1:])}  ({what})", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t:.0f} s",
              flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
