"""host_memory.retain_freed_memory: freed blocks are reused instead of page-faulted back in.

Each case runs in a fresh interpreter (the setting is process-wide). Measured with getrusage's minor page
faults: re-touching a freed 64 MiB malloc block costs ~16,000 faults (4 KiB pages) when glibc gives it back,
and none when it is retained; the same holds for the buffers of a jitted XLA:CPU function called again.
"""

import subprocess
import sys
import textwrap
import warnings

import pytest

from jaxgpt.train import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    from jaxgpt.train import host_memory
    applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 << 20

    def touch_faults():
        p = libc.malloc(n)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(p, 1, n)
        r1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        libc.free(p)
        return r1 - r0

    touch_faults()
    malloc_faults = touch_faults()  # the second 64 MiB block: fresh pages, or the first one's again

    import jax, jax.numpy as jnp
    # a gradient whose forward activation [4096, 2048] (32 MiB) is kept for the backward pass
    f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
    w, x = jnp.full((256, 2048), 0.01, jnp.float32), jnp.ones((4096, 256), jnp.float32)
    f(w, x).block_until_ready()
    f(w, x).block_until_ready()
    calls = []
    for _ in range(5):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(w, x).block_until_ready()
        calls.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    xla_faults = min(calls)  # the steady state: a stray event in one call does not count
    # glibc's heaps ("arenas") now: one when the setting held; more if a thread got its own heap before it
    libc.fopen.restype = ctypes.c_void_p
    stream = ctypes.c_void_p(libc.fopen(sys.argv[2].encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    arenas = open(sys.argv[2]).read().count("<heap nr=")
    print(applied, malloc_faults, xla_faults, arenas)
""")


def probe(mode: str, tmp_path) -> tuple[str, int, int, int]:
    info = tmp_path / f"malloc_info_{mode}.xml"
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(info)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, malloc_faults, xla_faults, arenas = out.stdout.split()[-4:]
    return applied, int(malloc_faults), int(xla_faults), int(arenas)


def test_retained_memory_is_reused_without_page_faults(tmp_path):
    failed = []
    for _ in range(2):  # one retry: once in a CI run, a retained process faulted the whole 32 MiB on every call
        applied, malloc_faults, xla_faults, arenas = probe("retain", tmp_path)  # (8,192 faults; 0 in 18 reruns)
        if xla_faults < 200:
            break
        failed.append(f"{xla_faults} faults a call with {arenas} malloc arena(s)")
    _, malloc_faults_default, xla_faults_default, _ = probe("default", tmp_path)
    assert applied == "True"
    # the control first, so that the assertions below can fail: glibc hands the 64 MiB block back (16,384
    # pages fault in again) and XLA's 32 MiB activation faults in on every call
    assert malloc_faults_default > 8000, malloc_faults_default
    assert xla_faults_default > 6000, xla_faults_default
    assert malloc_faults < 200, malloc_faults  # effectively none
    assert xla_faults < 200, (xla_faults, f"{arenas} arena(s)", xla_faults_default, failed)  # 0 vs ~9,000
    if failed:  # passed on the retry: say what the first try saw (pytest -rw), the one lead to the cause
        warnings.warn(f"retained probe needed a retry: {failed[0]}", stacklevel=1)


def test_idempotent():
    assert host_memory.retain_freed_memory() == host_memory.retain_freed_memory()
