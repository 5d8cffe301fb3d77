"""Sharding over devices and hosts: a ("data", "fsdp") mesh and the partition specs that go with it.

JAX is the distributed engine; this module only decides where each array lives:

- the mesh is a 2-D grid of all devices, axes ("data", "fsdp"); `make_mesh(data=-1, fsdp=1)` is plain data
  parallelism, `make_mesh(data=1, fsdp=-1)` is fully sharded (ZeRO-3 style) data parallelism;
- a batch is split along its first dimension over both axes (every device sees different rows);
- each large parameter is split along its largest dimension divisible by the fsdp size and replicated over
  "data"; small ones (norms, biases) are replicated. The rule reads only a leaf's shape, so the same
  function shards an optimizer state (Adam's mu and nu have their parameter's shape) or a whole train state.
  A stacked block leaf [L, ...] (jaxgpt.nn.stacking) gets one layer's spec with the layer axis unsplit.

`jax.jit(step, in_shardings=..., out_shardings=...)` then inserts the all-gathers and reduce-scatters.
Activations are pinned to the batch split too (`constrain_batch`, called by the model at the block
boundaries and inside attention), as MaxText does: without it XLA follows the fsdp-split weights and keeps
the whole global batch on every device with the heads split instead. The pins need the mesh at trace time,
so trace and call the step inside `with jax.set_mesh(mesh):` (`activation_mesh(mesh)`); without a mesh
context they are no-ops.
Multi-host runs call `maybe_initialize_distributed` first, before anything touches a device.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.nn.stacking import in_stacked
from jaxgpt.nn.weights import path_str

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device
DEFAULT_MIN_SIZE = 2**14  # leaves with fewer elements are replicated (norms, biases: gathering them costs more)


# ---------------------------------------------------------------------------------------------------------
# Mesh


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh of `devices` (default: every device of every host) with axes ("data", "fsdp").

    One of the two sizes may be -1, meaning "all remaining devices". data * fsdp must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh got an empty device list; pass devices=None to use every device")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: {name}={size!r} is not valid; use a positive integer or -1 (all the rest)")
    if data == -1 and fsdp == -1:
        raise ValueError("make_mesh: data and fsdp are both -1; fix one of them (e.g. fsdp=1)")
    if data == -1 or fsdp == -1:
        fixed = fsdp if data == -1 else data
        if n % fixed:
            raise ValueError(f"make_mesh: {n} devices cannot be split into groups of {fixed}; "
                             f"use a size that divides {n}")
        data, fsdp = (n // fixed, fixed) if data == -1 else (fixed, n // fixed)
    if data * fsdp != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} = {data * fsdp} but there are {n} devices; "
                         "make the product equal the device count, or set one axis to -1")
    try:  # topology-aware placement on TPU/GPU; on CPU this is a plain reshape
        grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES)


# ---------------------------------------------------------------------------------------------------------
# Partition specs


def partition_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_MIN_SIZE) -> P:
    """The spec of one array: its largest dimension divisible by `fsdp_size` goes over "fsdp".

    Replicated (P()) when fsdp_size is 1, the array has fewer than `min_size` elements, or no dimension
    divides evenly. Ties go to the earlier dimension.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))  # largest first, earlier dim on ties
    for axis in order:
        if shape[axis] % fsdp_size == 0:
            return P(*([None] * axis + [FSDP]))
    return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """A NamedSharding for every array leaf of `tree` (params, an optax state, a whole train state).

    Leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so the shardings can be chosen
    before anything is allocated. Scalars (step counters) are replicated.
    """
    fsdp_size = mesh.shape[FSDP]

    def one(path: Any, leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        if in_stacked(path) and shape:  # a stacked block leaf [L, ...]: a layer's own rule, layers unsplit
            return NamedSharding(mesh, P(None, *partition_spec(shape[1:], fsdp_size, min_size)))
        return NamedSharding(mesh, partition_spec(shape, fsdp_size, min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(params: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """NamedShardings for a params pytree (arrays or abstract shapes): large leaves split over "fsdp"."""
    return tree_shardings(params, mesh, min_size)


def opt_state_shardings(opt_state: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """NamedShardings for an optax state. Moments have their parameter's shape, so they get its sharding."""
    return tree_shardings(opt_state, mesh, min_size)


def abstract_on(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of a tree (arrays or shapes) placed on `shardings` (a tree like it): what `lower` takes
    to compile for a mesh without allocating anything."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Rows of a batch split over every device ("data" and "fsdp" together); other dimensions unsplit.

    batch_dim: where the rows are: 0 for [B, T]; 1 for [A, B, T] (gradient-accumulation micro-batches first).
    """
    return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device (losses, metrics, step counters)."""
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------
# Activations


def activation_mesh(mesh: Mesh | None) -> Any:
    """The context the train step is traced and run in, so `constrain_batch` sees the mesh (None: no mesh)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep x [B, ...] split along its rows over ("data", "fsdp") when such a mesh is active at trace time.

    A no-op without a mesh context, on a mesh of one device, inside shard_map over these axes, or when B does
    not divide by the device count (one-row decoding on a mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or set(BATCH_AXES) & set(mesh.manual_axes):
        return x
    n = mesh.shape[DATA] * mesh.shape[FSDP]
    if n == 1 or x.ndim == 0 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


# ---------------------------------------------------------------------------------------------------------
# Placing arrays


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Several hosts: every process holds the full value (same seed / same file); each keeps its own pieces.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(tree: Any, shardings: Any) -> Any:
    """Place a pytree (params, optimizer state) held whole by every process onto `shardings`."""
    return jax.tree.map(_put, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh, batch_dim: int = 0) -> Any:
    """Turn each process's rows of the global batch into one global array split over all devices.

    batch: a pytree of host arrays [B_local, ...] (rows along `batch_dim`); with one process B_local is the
    global batch. Rows are concatenated in process order: process p holds rows [p * B_local, (p + 1) * B_local).
    (When every process holds the whole global batch instead, `jax.device_put(batch, batch_sharding(mesh))`
    places it.)
    """
    sharding = batch_sharding(mesh, batch_dim)
    n_local = len(mesh.local_devices)

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim <= batch_dim or x.shape[batch_dim] % n_local:
            raise ValueError(f"shard_batch: a batch leaf of shape {x.shape} cannot be split over {n_local} local "
                             f"devices along dim {batch_dim}; use a per-process batch size that is a multiple "
                             f"of {n_local}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a whole NumPy array on this host, for writing files: arrays split over devices of several
    processes are all-gathered first (every process must call this together); local arrays are fetched."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return jax.tree.map(one, tree)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args: Any,
                 min_size: int = DEFAULT_MIN_SIZE) -> tuple[Any, Any]:
    """Run `init_fn(*args)` under jit so its outputs are born sharded (no full copy on one device).

    Returns (tree, shardings). Use it for params or a whole train state: `sharded_init(create_state, mesh, rng)`.
    """
    shardings = tree_shardings(jax.eval_shape(init_fn, *args), mesh, min_size)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def spec_summary(tree: Any) -> dict[str, tuple]:
    """{"h_0/attn/c_attn/kernel": (None, "fsdp"), ...}: the spec of every leaf of an array or sharding tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = leaf if isinstance(leaf, NamedSharding) else leaf.sharding
        out[path_str(path)] = tuple(sharding.spec)
    return out


# ---------------------------------------------------------------------------------------------------------
# Several hosts


def distributed_args(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Decide whether (and how) to call `jax.distributed.initialize`; None means a single-process run.

    In order: explicit arguments (command-line flags); JAX's own variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID; JAXGPT_DISTRIBUTED=1 (Cloud TPU pod slices, where JAX finds the
    coordinator itself); a multi-task Slurm or Open MPI job (JAX reads their variables).
    """
    env = os.environ if environ is None else environ
    if coordinator is None and num_processes is None and process_id is None:
        if "JAX_COORDINATOR_ADDRESS" in env:
            coordinator = env["JAX_COORDINATOR_ADDRESS"]
            try:
                num_processes = int(env["JAX_NUM_PROCESSES"])
                process_id = int(env["JAX_PROCESS_ID"])
            except (KeyError, ValueError) as e:
                raise ValueError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                                 f"integers too ({type(e).__name__}: {e}); export all three") from None
        elif env.get("JAXGPT_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
            return {}  # let JAX detect the cluster (Cloud TPU metadata, GKE, Slurm, Open MPI)
        elif int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
            return {}
        elif int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1 and "OMPI_MCA_orte_hnp_uri" in env:
            return {}
        else:
            return None
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"multi-host run needs coordinator, num_processes and process_id together; "
                         f"missing {', '.join(missing)}")
    num_processes, process_id = int(num_processes), int(process_id)
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not valid for num_processes={num_processes}; "
                         f"use 0 .. {num_processes - 1}")
    if ":" not in str(coordinator):
        raise ValueError(f"coordinator={coordinator!r} has no port; use host:port, e.g. 10.0.0.1:1234")
    if num_processes == 1:
        return None
    return {"coordinator_address": str(coordinator), "num_processes": num_processes, "process_id": process_id}


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None,
                                 environ: Mapping[str, str] | None = None,
                                 heartbeat_timeout_s: int | None = None) -> bool:
    """Call `jax.distributed.initialize` when flags or the environment describe a multi-process run.

    Must run before any computation or `jax.devices()`. No-op (returns False) for a single process or when
    already initialized; returns True when it initialized. On CPU, cross-process collectives use gloo.

    heartbeat_timeout_s (default $JAXGPT_HEARTBEAT_TIMEOUT_S, else 100 s, JAX's default): a process that is
    silent this long (dead, stopped, hung, unreachable) ends every other one within about this bound instead of
    leaving it in a collective. `PeerWatchdog` ends them with one line naming the silent process; JAX's own
    heartbeat, given twice the bound, stays behind it as a backstop (it aborts with a stack trace).
    """
    env = os.environ if environ is None else environ
    args = distributed_args(coordinator, num_processes, process_id, env)
    if args is None or jax.distributed.is_initialized():
        return False
    heartbeat = heartbeat_timeout_s or env.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S
    if not str(heartbeat).isdigit() or int(heartbeat) < 1:
        raise ValueError(f"heartbeat timeout {heartbeat!r} is not valid; use a whole number of seconds >= 1 "
                         f"({HEARTBEAT_ENV})")
    args["heartbeat_timeout_seconds"] = 2 * int(heartbeat)
    # Cross-process collectives of the CPU backend (CPU-only runs and tests); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    from jax._src.distributed import global_state

    PeerWatchdog(global_state.client, jax.process_index(), jax.process_count(), int(heartbeat)).start()
    return True


HEARTBEAT_ENV = "JAXGPT_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_S = 100  # JAX's default heartbeat timeout
ALIVE_PREFIX = "jaxgpt/alive/"  # the key-value store's directory of the processes' counters
DONE = "done"  # the counter's last value, written at exit: a finished process is not a silent one


class PeerWatchdog:
    """Ends this process, with one line naming the culprit, when another process of the run goes silent.

    JAX's coordination service notices a dead or stopped process only when its own heartbeat times out, then
    aborts the others with a stack trace, and when process 0 (which hosts the service) is the silent one its
    message does not say so (jaxlib 0.10's missed-heartbeat callback cannot be set from Python). So each
    process runs two daemon threads over the service's key-value store: `beat` sets `jaxgpt/alive/<process>`
    to a new counter every `timeout_s / 10` s and reads every process's counter; `watch` exits the process
    (status 1) when a peer's counter has not moved for `timeout_s`, or when the service has not answered for
    that long (process 0 is stopped or unreachable). A stalled process's threads stall with it (SIGSTOP, a
    frozen VM), so the others notice it; a process whose main thread holds the GIL for `timeout_s` would look
    silent too, which is why the bound is seconds on the tests' tiny runs and JAX's 100 s by default.
    At exit each process writes "done" and stops watching, so one that finishes (or fails) first is not taken
    for a silent one; JAX's heartbeat covers the rest.
    """

    def __init__(self, client: Any, process: int, n_processes: int, timeout_s: float) -> None:
        self.client, self.process, self.n, self.timeout_s = client, process, n_processes, timeout_s
        self.interval = min(max(timeout_s / 10, 0.1), 10.0)
        now = time.monotonic()
        self.answered = now  # when the service last answered this process
        self.changed = {p: now for p in range(n_processes) if p != process}  # when each peer's counter last moved
        self.values: dict[int, str] = {}
        self.stopped = threading.Event()

    def start(self) -> PeerWatchdog:
        for fn in (self.beat, self.watch):
            threading.Thread(target=fn, name=f"jaxgpt-{fn.__name__}", daemon=True).start()
        atexit.register(self.stop)  # after jax's own exit handler is registered, so it runs before it
        return self

    def beat(self) -> None:
        count = 0
        while not self.stopped.wait(self.interval):
            count += 1
            try:
                self.client.key_value_set(f"{ALIVE_PREFIX}{self.process}", str(count), allow_overwrite=True)
                seen = self.client.key_value_dir_get(ALIVE_PREFIX)
            except Exception:  # noqa: BLE001 - the service did not answer: `watch` counts the time
                seen = None
            if seen is not None:
                self.saw(seen, time.monotonic())

    def saw(self, seen: Sequence[tuple[str, str]], now: float) -> None:
        """The counters read back: `(key, value)` pairs of every process that has set one."""
        self.answered = now
        for key, value in seen:
            peer = int(key.rsplit("/", 1)[1])
            if peer != self.process and self.values.get(peer) != value:
                self.values[peer], self.changed[peer] = value, now

    def watch(self) -> None:
        while not self.stopped.wait(self.interval):
            line = self.silent(time.monotonic())
            if line and not self.stopped.is_set():
                print(line, file=sys.stderr, flush=True)
                os._exit(1)

    def silent(self, now: float) -> str | None:
        """The one line naming a silent process, or None when every one is heard from (or has finished)."""
        t, me = self.timeout_s, f"process {self.process} stops too; rerun the job to resume from its last checkpoint"
        if now - self.answered > t:
            return (f"process 0 of {self.n} (it hosts the coordination service) did not answer for {t:g} s: it is "
                    f"stopped, hung or unreachable; {me}")
        for peer, changed in sorted(self.changed.items()):
            if self.values.get(peer) != DONE and now - changed > t:
                return (f"process {peer} of {self.n} sent no heartbeat for {t:g} s: it is stopped, hung or "
                        f"unreachable; {me}")
        return None

    def stop(self) -> None:
        """At exit: stop watching and tell the others this process is done."""
        self.stopped.set()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{ALIVE_PREFIX}{self.process}", DONE, allow_overwrite=True)
