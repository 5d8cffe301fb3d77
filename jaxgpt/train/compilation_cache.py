"""JAX's persistent compilation cache for training runs: compile a config once per machine, not once per run.

XLA compiles the train step, the evaluation and the parameter init of every run (~7 s for nanoGPT's CPU recipe
on a 2-core CPU; more for larger models). With the cache on, a later run of the same
shapes on the same machine (a rerun, a resume after preemption, another seed) loads the executables from disk.
Entries are keyed by the program, the compile options, the JAX/XLA version and the backend, so a changed model
or flag simply compiles anew; XLA:CPU also checks that a cached executable suits the host's CPU and compiles
anew when it does not. The setting is process-wide, so entry points (train.py, benchmarks) call `enable`.

train.py turns it on for accelerators (GPU, TPU) by default and on CPU only when asked
(`--config.compilation_cache_on_cpu=True`): on some x86 hosts (Intel AVX-512 parts) XLA:CPU rejects every
executable it cached itself, logging an error for each and compiling anew (jax-ml/jax#38445).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxgpt.train.config import COMPILATION_CACHE_DIR as DEFAULT_DIR
from jaxgpt.train.config import COMPILATION_CACHE_MIN_SECS as DEFAULT_MIN_SECS


def enable(path: str | os.PathLike | None = DEFAULT_DIR, min_compile_secs: float = DEFAULT_MIN_SECS) -> str | None:
    """Cache compiled executables in `path` (created if missing); returns the directory in use, or None.

    `path` empty or None leaves the cache as JAX has it (off unless JAX_COMPILATION_CACHE_DIR is set). A
    directory already chosen through JAX's own setting (JAX_COMPILATION_CACHE_DIR) is kept: the user's explicit
    choice wins. Only compilations that took at least `min_compile_secs` are written. Call before the first
    compilation.
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


def enable_for_training(path: str | os.PathLike | None, min_compile_secs: float = DEFAULT_MIN_SECS,
                        on_cpu: bool = False) -> str | None:
    """`enable` unless the backend is the CPU and `on_cpu` is False; call after jax.distributed.initialize()."""
    if not path or (jax.default_backend() == "cpu" and not on_cpu):
        return jax.config.jax_compilation_cache_dir or None
    return enable(path, min_compile_secs)
