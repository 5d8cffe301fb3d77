"""Faults a long run meets, each made for real: a disk that fills during a checkpoint save (a small tmpfs in a
private mount namespace, and the same failure injected at orbax's commit where mounting is not allowed), a
metrics write cut short, a dead process in a two-process run, and a run resumed on a mesh of another size.

Runs that need their own devices or namespace run this file as a script in a subprocess
(`python tests/test_faults.py WORKER ...`) and the test reads the JSON it prints.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from helpers import xla_env

from jaxgpt.io import checkpoint
from jaxgpt.io.workdir import Workdir
from jaxgpt.train import metrics, trainer
from jaxgpt.train.config import OptimConfig

pytestmark = pytest.mark.run

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: the subprocesses share the cores with whatever else runs
# XLA:CPU without its optimizations and fusion emitters compiles the train step several times faster
# the tiny config made smaller still; TensorBoard stays on where a full disk must make its writer fail too
TINIEST = {"model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16, "eval_iters": 1, "sample_tokens": 0}
# checkpoints at 1, 2, 3: the save of step FAIL_AT meets the fault, KEPT stays; the rerun goes on to LAST
FAIL_AT, KEPT, LAST = 2, 1, 3
FULL_DISK = {**TINIEST, "max_iters": LAST, "lr_decay_iters": 10, "warmup_iters": 1, "ckpt_interval": 1,
             "eval_interval": 100, "log_interval": 1}


def tiny(data_dir: str | Path, **more):
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.update_from_flattened_dict({"data.dir": str(data_dir), **more})
    return c


def valid_json_lines(path: Path) -> bool:
    text = path.read_text()
    return text.endswith("\n") and all(isinstance(json.loads(ln), dict) for ln in text.splitlines())


def ckpt_names(wd: Path) -> list[str]:
    return sorted(p.name for p in (wd / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------------
# A full disk during a checkpoint save


def fill_disk(where: Path) -> int:
    """Write zeros under `where` until its filesystem is full; returns the bytes written."""
    n, block = 0, b"\0" * 65536
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return n


def worker_full_disk(wd: Path, data_dir: str) -> dict:
    """Train until the save of step FAIL_AT, fill the disk just before it, then free the space and rerun."""
    from jaxgpt.train import hooks

    save = checkpoint.save_run_step

    def filling_save(mngr, step, **kw):
        if step == FAIL_AT:
            fill_disk(wd)
        return save(mngr, step, **kw)

    hooks.checkpoint.save_run_step = filling_save
    out: dict = {"error": None}
    try:
        trainer.train(tiny(data_dir, **FULL_DISK), wd)
    except OSError as e:
        out.update(error=str(e), errno=e.errno)
    hooks.checkpoint.save_run_step = save
    out.update(ckpts=ckpt_names(wd), metrics_valid=valid_json_lines(wd / "metrics.jsonl"),
               last_logged=max(r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"),
               restorable=int(Workdir(wd).load()[1]["wte"]["embedding"].shape[0]) > 0,
               lock_left=(wd / ".lock").exists())
    (wd / "filler").unlink()
    summary = trainer.train(tiny(data_dir, **FULL_DISK), wd)  # the same command again, with space
    out.update(resumed=[r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "resume"],
               final_step=summary["step"], final_ckpts=ckpt_names(wd),
               final_metrics_valid=valid_json_lines(wd / "metrics.jsonl"))
    return out


def _can_mount_tmpfs(tmp: Path) -> bool:
    d = tmp / "probe"
    d.mkdir()
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def assert_full_disk_outcome(out: dict, wd: Path) -> None:
    assert out["errno"] == errno.ENOSPC, out
    msg = out["error"]
    assert "\n" not in msg and f"saving checkpoint step {FAIL_AT}" in msg and "the disk is full" in msg, msg
    assert f"the disk mounted at {wd} has 0.0 MiB free" in msg, msg
    assert f"step {KEPT} is kept and restorable" in msg and "run the same command to resume" in msg, msg
    assert out["ckpts"] == [str(KEPT)], out  # no partial step left taking space
    assert out["metrics_valid"] and out["last_logged"] == FAIL_AT - 1 and out["restorable"], out
    assert not out["lock_left"], out
    assert out["resumed"] == [KEPT] and out["final_step"] == LAST and out["final_metrics_valid"], out
    assert {str(FAIL_AT), str(LAST)} <= set(out["final_ckpts"]), out


def test_a_full_disk_during_a_save_stops_with_a_clear_error_and_keeps_the_last_checkpoint(pydoc_char_dir, tmp_path):
    """A real full disk: an 8 MiB tmpfs (a private mount namespace), filled just before the save of FAIL_AT."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (unshare -rm not permitted); the injected variant below runs")
    wd = tmp_path / "small_disk"
    wd.mkdir()
    env = xla_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the rerun reuses compiles
    cmd = (f"mount -t tmpfs -o size=8m tmpfs {wd} && exec {sys.executable} {__file__} full_disk {wd} "
           f"{pydoc_char_dir}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_full_disk_outcome(out, wd)


def test_a_save_failing_with_enospc_at_the_commit_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The Checkpointer alone, where mounting is not allowed: ENOSPC raised by orbax's commit of step FAIL_AT
    (every file written, the rename refused) gives the same one-line error; step KEPT stays restorable."""
    from orbax.checkpoint._src.path import atomicity

    from jaxgpt.train import hooks, steps

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def full(self, *a, **kw):
        if self.get_final().name == str(FAIL_AT):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await finalize(self, *a, **kw)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}

    class NoEval:
        last, last_step = {}, None

    mngr = checkpoint.run_checkpoint_manager(Workdir(tmp_path).checkpoints)
    ckpt = hooks.Checkpointer(mngr, {"seed": 0}, NoEval(), lambda: None, None)
    tx = steps.make_optimizer(OptimConfig.of(tiny(tmp_path)))
    state = steps.init_state(params, tx)
    ckpt(KEPT, state)
    with pytest.raises(OSError, match=rf"saving checkpoint step {FAIL_AT} .*the disk is full.*step {KEPT} is kept") as e:
        ckpt(FAIL_AT, state.replace(params={k: v + 1 for k, v in params.items()}))
    mngr.close()
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert ckpt_names(tmp_path) == [str(KEPT)]  # the partial step is gone
    mngr = checkpoint.run_checkpoint_manager(Workdir(tmp_path).checkpoints, read_only=True)
    got = checkpoint.restore_run_step(mngr, KEPT, params=params)["params"]
    mngr.close()
    chex.assert_trees_all_equal(got, params)


def test_a_metrics_write_cut_short_leaves_only_whole_lines(tmp_path, monkeypatch):
    """A write that stops part way (the disk filled) is cut back to the last whole line and raised clearly;
    the next write after space is freed appends a whole line."""
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    log.write({"kind": "train", "step": 0, "loss": 1.5})
    real_write = os.write

    def short_then_full(fd, data):
        if len(data) > 8:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a part, as a filling disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", short_then_full)
    with pytest.raises(OSError, match=r"cannot append to .*metrics.jsonl \(No space left on device\)"):
        log.write({"kind": "train", "step": 1, "loss": 1.25})
    assert path.read_text() == json.dumps({"kind": "train", "step": 0, "loss": 1.5}) + "\n"
    monkeypatch.setattr(metrics.os, "write", real_write)
    log.write({"kind": "train", "step": 1, "loss": 1.25})
    assert [r["step"] for r in metrics.read_metrics(path)] == [0, 1] and valid_json_lines(path)


# ---------------------------------------------------------------------------------------------------------
# A dead process in a two-process run (gloo collectives on localhost, as tests/test_sharding.py)

HEARTBEAT_S = 2  # JAXGPT_HEARTBEAT_TIMEOUT_S of the workers: the bound on noticing a dead peer


# one of two processes: an all-gather every 0.1 s until the other one dies (JAX and jaxgpt.sharding only)
COLLECTIVES = r"""
import sys, time
from pathlib import Path
import numpy as np
from jax.experimental import multihost_utils
from jaxgpt import sharding as sh
assert sh.maybe_initialize_distributed() is True
i = 0
while True:
    multihost_utils.process_allgather(np.array([i], np.int32))
    (Path(sys.argv[1]) / f"step_{sh.jax.process_index()}").write_text(str(i))
    i += 1
    time.sleep(0.1)
"""


def start_collectives(tmp_path: Path) -> list[subprocess.Popen]:
    """Two processes running COLLECTIVES, returned once both have done an all-gather."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAXGPT_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S)}
        log = (tmp_path / f"p{i}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-c", COLLECTIVES, str(tmp_path)], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + TIMEOUT_S
    while not all((tmp_path / f"step_{i}").is_file() for i in range(2)):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail((tmp_path / "p0.log").read_text()[-2000:])
        time.sleep(0.1)
    return procs


@pytest.mark.parametrize("victim", [1, 0])  # a worker; the coordinator (it hosts JAX's coordination service)
def test_a_dead_process_stops_the_other_within_the_heartbeat_bound(tmp_path, victim):
    procs = start_collectives(tmp_path)
    try:
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        survivor = procs[1 - victim]
        code = survivor.wait(timeout=HEARTBEAT_S + 60)  # never a hang: a TimeoutExpired fails the test
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / f"p{1 - victim}.log").read_text()
    assert code != 0 and waited < HEARTBEAT_S + 30, (code, waited)  # the bound, with slack for a loaded machine
    assert ("Terminating process because the JAX distributed service detected fatal errors" in log  # socket closed
            or "Connection reset by peer" in log or f"process {victim} of 2 sent no heartbeat" in log
            or "(it hosts the coordination service)" in log), log[-3000:]


@pytest.mark.parametrize("victim", [1, 0])  # a worker; process 0, which hosts JAX's coordination service
def test_a_stopped_process_ends_the_other_within_the_heartbeat_with_one_line_naming_it(tmp_path, victim):
    """SIGSTOP: the victim's sockets stay open (no connection reset) and it answers nothing, as a frozen host
    does on TPU and GPU pods. The survivor exits, non-zero, within the heartbeat timeout (+ 5 s for a loaded
    machine), with jaxgpt's one line naming the silent process, before JAX's own heartbeat (twice as long)."""
    procs, survivor = start_collectives(tmp_path), 1 - victim
    try:
        procs[victim].send_signal(signal.SIGSTOP)
        t0 = time.time()
        code = procs[survivor].wait(timeout=HEARTBEAT_S + 60)  # never a hang: a TimeoutExpired fails the test
        waited = time.time() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    log = (tmp_path / f"p{survivor}.log").read_text()
    assert code == 1 and waited < HEARTBEAT_S + 5, (code, waited, log[-3000:])
    lines = [ln for ln in log.splitlines() if "sent no heartbeat" in ln or "did not answer" in ln]
    named = (f"process 1 of 2 sent no heartbeat for {HEARTBEAT_S} s" if victim == 1 else
             f"process 0 of 2 (it hosts the coordination service) did not answer for {HEARTBEAT_S} s")
    want = (f"{named}: it is stopped, hung or unreachable; process {survivor} stops too; rerun the job to resume "
            "from its last checkpoint")
    assert lines == [want], log[-3000:]
    assert "Connection reset by peer" not in log and "Terminating process" not in log, log[-3000:]


def test_the_watchdog_names_a_peer_whose_counter_stands_still_and_forgets_a_finished_one():
    """PeerWatchdog's bookkeeping with the clock passed in (no threads, no service): process 2 of 3 watches."""
    from jaxgpt import sharding as sh

    dog = sh.PeerWatchdog(client=None, process=2, n_processes=3, timeout_s=2)
    t0 = dog.answered
    tail = "it is stopped, hung or unreachable; process 2 stops too; rerun the job to resume from its last checkpoint"
    dog.saw([("jaxgpt/alive/0", "1"), ("jaxgpt/alive/1", "1"), ("jaxgpt/alive/2", "1")], t0 + 1)
    assert dog.silent(t0 + 2.9) is None  # both peers moved at t0 + 1
    dog.saw([("jaxgpt/alive/0", "2"), ("jaxgpt/alive/1", "1"), ("jaxgpt/alive/2", "2")], t0 + 2.5)
    assert dog.silent(t0 + 3.1) == f"process 1 of 3 sent no heartbeat for 2 s: {tail}"  # 1 stood still since t0 + 1
    dog.saw([("jaxgpt/alive/0", "3"), ("jaxgpt/alive/1", sh.DONE)], t0 + 3.2)
    assert dog.silent(t0 + 5.0) is None  # process 1 finished; process 0 moved at t0 + 3.2
    assert dog.silent(t0 + 5.3) == f"process 0 of 3 (it hosts the coordination service) did not answer for 2 s: {tail}"


def test_a_bad_heartbeat_timeout_is_refused():
    from jaxgpt import sharding as sh

    with pytest.raises(ValueError, match=r"heartbeat timeout '-3' is not valid; use a whole number of seconds"):
        sh.maybe_initialize_distributed("127.0.0.1:1", 2, 0, environ={"JAXGPT_HEARTBEAT_TIMEOUT_S": "-3"})


# ---------------------------------------------------------------------------------------------------------
# Resume on another mesh: checkpointed on 8 devices (2 x 4), resumed on 4 (1 x 4) and on 1

SAVE_AT = 2  # the 8-device runs stop at SAVE_AT; resumed on another mesh they take the step after it
MESHES = {8: (2, 4), 4: (1, 4), 1: (1, 1)}
# batch 8 splits over 8 devices; min_shard_size 256 splits the kernels (and Adam's moments) over fsdp
MESH_RUN = {**TINIEST, "batch_size": 8, "max_iters": SAVE_AT, "lr_decay_iters": 10, "warmup_iters": 1,
            "ckpt_interval": SAVE_AT, "eval_interval": 100, "tensorboard": False, "mesh.min_shard_size": 256,
            "lora.export": False}


def mesh_config(data_dir: str, devices: int, kind: str, base: Path, **more):
    data, fsdp = MESHES[devices]
    lora = {"init_from": "run", "init_path": str(base), "lora.rank": 2, "lora.alpha": 4.0,
            "lora.targets": ("attn/c_attn", "mlp/c_fc")} if kind == "lora" else {}
    return tiny(data_dir, **{**MESH_RUN, "mesh.data": data, "mesh.fsdp": fsdp, **lora, **more})


def train_losses(wd: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r["kind"] == "train"}


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class MeshRun:
    """What a run of config `c` places on this process's mesh: the model, the train state's structure (with
    the LoRA base, frozen), the optimizer and the shardings, built as `train` builds them."""

    def __init__(self, c) -> None:
        import jax

        from jaxgpt import data as data_lib
        from jaxgpt.train import config as train_config
        from jaxgpt.train import run as runs
        from jaxgpt.train.program import build_program

        p = train_config.parts(c)
        init = runs.initial_model(p.start, p.model, data_lib.load_meta(Path(c.data.dir)))
        self.c, self.cfg = c, init.model_cfg
        self.trainable = runs.trainable_of(p.lora, p.start.init_from, p.loop.seed)
        program = build_program(init.model_cfg, p.optim, p.mesh, grad_accum=p.loop.grad_accum,
                                batch_rows=p.loop.batch_size, trainable=self.trainable)
        self.mesh, self.tx, self.shardings = program.mesh, program.tx, program.saved_shardings
        state, self.frozen = runs.initial_state(init.model_cfg, init.params, c.seed, self.tx, self.trainable, True)
        self.abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def restore(self, wd: Path, step: int, shardings=None):
        """runs.restore_state of `step` onto `shardings` (default: onto this process's first device alone)."""
        import jax

        from jaxgpt.train import run as runs

        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        mngr = checkpoint.run_checkpoint_manager(Workdir(wd).checkpoints, read_only=True)
        try:
            return runs.restore_state(mngr, Workdir(wd), step, self.abstract,
                                      shardings or jax.tree.map(lambda _: one, self.abstract))
        finally:
            mngr.close()


def restored_here(run: MeshRun, wd: Path) -> tuple[dict, object]:
    """Step SAVE_AT restored onto this process's mesh: where its leaves land, and whether their values are the
    ones saved. Returns (report, the state read back without any sharding)."""
    import jax

    got, plain = run.restore(wd, SAVE_AT, run.shardings.state), run.restore(wd, SAVE_AT)
    leaves, want = jax.tree.leaves(got), jax.tree.leaves(run.shardings.state)
    return {"n_devices": sorted({len(x.sharding.device_set) for x in leaves}),
            "n_split": sum(not x.sharding.is_fully_replicated for x in leaves), "n_leaves": len(leaves),
            "same_shardings": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, want)),
            "equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                         for a, b in zip(leaves, jax.tree.leaves(plain)))}, plain


def train_keeping_its_step(c, wd: Path):
    """trainer.train(c, wd); returns the jitted train step it built (steps.make_train_step, watched)."""
    made = []
    make = trainer.steps.make_train_step
    trainer.steps.make_train_step = lambda *a, **kw: made.append(make(*a, **kw)) or made[-1]
    try:
        trainer.train(c, wd)
    finally:
        trainer.steps.make_train_step = make
    return made[-1]


def one_step(run: MeshRun, plain, train_step) -> tuple[float, dict, bool]:
    """The reference: `train_step` on this mesh from the state read back, on the batch of step SAVE_AT.
    Returns (loss, the state after it, whether the params moved)."""
    import jax

    from jaxgpt import sharding as sh
    from jaxgpt.data import batches

    c, shardings = run.c, run.shardings
    data = batches.TrainBatches(c.data.dir, seed=c.seed, accum=1, batch=c.batch_size, block=run.cfg.block_size,
                                eval_iters=1, batch_sharding=shardings.batch, vocab_size=run.cfg.vocab_size)
    frozen = None if run.frozen is None else jax.device_put(run.frozen, shardings.frozen)
    host = jax.tree.map(np.asarray, plain)  # placed from the host: no slicing programs to compile
    before, rng = flat(host), jax.random.fold_in(jax.random.PRNGKey(c.seed), 1)  # `train`'s dropout key
    with sh.activation_mesh(run.mesh):
        after, m = train_step(jax.device_put(host, shardings.state), data.place(data.host(SAVE_AT)), rng, frozen)
    after = flat(after)
    moved = any(not np.array_equal(after[k], v) for k, v in before.items() if k.startswith(".params"))
    return float(m["loss"]), after, moved


def worker_mesh(job: str, root: Path, data_dir: str) -> dict:
    """job "save" (8 devices): full and LoRA runs to SAVE_AT. job "resume" (4 or 1 devices): for each, the
    checkpoint restored onto this mesh, a copy of the 8-device run resumed by `train` for the step after it,
    and the reference: that step taken from the values read back, as a run on this mesh takes it (with the
    step `train` compiled, so nothing compiles twice). The states after that step go to npz files."""
    import jax

    n = jax.device_count()
    out: dict = {"devices": n}
    deadline = time.time() + TIMEOUT_S
    while job == "resume" and not (root / "saved").exists():  # started beside the 8-device run: wait for it
        assert time.time() < deadline, "the 8-device run did not finish"
        time.sleep(0.1)
    for kind in ("full", "lora"):
        c = mesh_config(data_dir, n, kind, root / "full_8", max_iters=SAVE_AT if job == "save" else SAVE_AT + 1)
        wd = root / f"{kind}_{n}"
        if job == "save":
            trainer.train(c, wd)
            continue
        shutil.copytree(root / f"{kind}_8", wd)
        run = MeshRun(c)
        out[kind], plain = restored_here(run, wd)
        train_step = train_keeping_its_step(c, wd)
        out[kind]["loss"], after, out[kind]["moved"] = one_step(run, plain, train_step)
        np.savez(root / f"{kind}_{n}_ref.npz", **after)
        np.savez(root / f"{kind}_{n}_resumed.npz", **flat(run.restore(wd, SAVE_AT + 1)))
        out[kind].update(resumed_losses=train_losses(wd), resumed_from=[
            r["step"] for r in metrics.read_metrics(wd / "metrics.jsonl") if r.get("event") == "resume"])
    return out


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def test_a_run_checkpointed_on_8_devices_resumes_on_4_and_on_1(pydoc_char_dir, tmp_path):
    """Full and LoRA runs: the state restored onto the new mesh is the saved one, placed with the new
    shardings; `train` resumed there takes the step after the checkpoint bit for bit as a run that never left
    the new mesh takes it from the saved state (loss, params and optimizer state), and the 4- and 1-device
    meshes agree (rtol 1e-5: float32, only the reduction order across devices differs)."""
    def run(job: str, devices: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "mesh", job, str(tmp_path), str(pydoc_char_dir)],
                                env=xla_env(devices), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen) -> dict:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    procs = {n: run("save" if n == 8 else "resume", n) for n in (8, 4, 1)}  # 4 and 1 start up meanwhile
    try:
        saved = result(procs[8])
        (tmp_path / "saved").touch()
        outs = {n: result(procs[n]) for n in (4, 1)}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert saved["devices"] == 8
    for n, out in outs.items():
        assert out["devices"] == n
        for kind in ("full", "lora"):
            r, name = out[kind], f"{kind} on {n} devices"
            assert r["n_devices"] == [n] and r["n_leaves"] > 3, (name, r)  # every leaf lives on the new mesh
            assert r["same_shardings"] and r["equal"] and r["moved"], (name, r)
            assert kind == "lora" or (r["n_split"] > 0) == (n > 1), (name, r)  # split over fsdp on 1 x 4
            assert r["resumed_from"] == [SAVE_AT], (name, r)
            assert sorted(r["resumed_losses"], key=int) == [str(s) for s in range(SAVE_AT + 1)], (name, r)
            resumed = r["resumed_losses"][str(SAVE_AT)]
            assert resumed == r["loss"], (name, resumed, r["loss"])
            chex.assert_trees_all_equal(npz(tmp_path / f"{kind}_{n}_resumed.npz"), npz(tmp_path / f"{kind}_{n}_ref.npz"))
    for kind in ("full", "lora"):  # and the two meshes agree
        np.testing.assert_allclose(outs[4][kind]["loss"], outs[1][kind]["loss"], rtol=1e-5)
        chex.assert_trees_all_close(npz(tmp_path / f"{kind}_4_resumed.npz"), npz(tmp_path / f"{kind}_1_resumed.npz"),
                                    rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
    import jax  # noqa: F401

    job = sys.argv[1]
    if job == "full_disk":
        print(json.dumps(worker_full_disk(Path(sys.argv[2]), sys.argv[3])))
    elif job == "mesh":
        print(json.dumps(worker_mesh(sys.argv[2], Path(sys.argv[3]), sys.argv[4])))
    else:
        raise SystemExit(f"unknown job {job}")
