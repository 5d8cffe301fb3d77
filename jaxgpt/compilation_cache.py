"""JAX's persistent compilation cache for training runs: compile a config once per machine, not once per run.

XLA compiles the train step, the evaluation and the parameter init of every run (on a 2-core CPU, ~7 s for
nanoGPT's CPU recipe; on accelerators, tens of seconds at 124M). With the cache on, a later run of the same
shapes on the same machine (a rerun, a resume after preemption, another seed) loads the executables from disk.
Entries are keyed by the program, the compile options, the JAX/XLA version and the backend, so a changed model
or flag simply compiles anew; XLA:CPU also checks that a cached executable suits the host's CPU and compiles
anew when it does not. The setting is process-wide, so entry points (train.py, benchmarks) call `enable`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = "~/.cache/jaxgpt/xla"


def enable(path: str | os.PathLike | None = DEFAULT_DIR, min_compile_secs: float = 0.5) -> str | None:
    """Cache compiled executables in `path` (created if missing); returns the directory in use, or None.

    `path` empty or None leaves the cache as JAX has it (off unless JAX_COMPILATION_CACHE_DIR is set). A
    directory already chosen through JAX's own setting (JAX_COMPILATION_CACHE_DIR) is kept: the user's explicit
    choice wins. Only compilations that took at least `min_compile_secs` are written (JAX's default is 1 s;
    0.5 s also catches the evaluation step of small models). Call before the first compilation.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    if not path:
        return None
    if min_compile_secs < 0:
        raise ValueError(f"min_compile_secs={min_compile_secs} must be >= 0")
    if "://" in str(path):  # a bucket (gs://...): shared by the hosts of a TPU pod slice
        d = str(path)
    else:
        d = Path(path).expanduser()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the compilation cache directory {d} ({e.strerror}); choose another "
                             "with --config.compilation_cache_dir=DIR, or '' to compile every run afresh") from None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_compilation_cache_dir", str(d))
    return str(d)
