"""Two training processes as one run (gloo collectives on localhost, one CPU device each), against one process
with two devices (the same mesh, the same program): a SIGTERM to either process stops both after the same
step with one checkpoint, a second signal during that save does not cut it short, the resumed run continues
the uninterrupted one bit for bit, and the evaluations (validation loss, HellaSwag) are those of one process.

One pair of short runs serves every test (module fixture `runs`): the stopped two-process run, its two-process
resume and the one-process reference run beside it. Each process is `train.py` itself, started through this
file (`python tests/test_multihost.py WORKDIR FLAGS...`) so that a process can send itself the second signal
just as the stop's checkpoint starts to be written.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import xla_env

from jaxgpt.train import metrics

pytestmark = pytest.mark.run

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # the whole fixture, generous for a loaded 2-core machine
STOP_AFTER = 8  # the test sends SIGTERM once the log holds this step
LAST = 40  # the resumed run and the reference stop here
EVERY = 5  # validation loss and HellaSwag every EVERY steps
# the tiny config made smaller; the same schedule whatever max_iters is (lr_decay_iters fixed)
RUN = {"model.n_layer": 1, "model.n_embd": 16, "eval_iters": 2, "sample_tokens": 0,
       "batch_size": 4, "warmup_iters": 2, "lr_decay_iters": LAST, "log_interval": 1, "ckpt_interval": 1000,
       "eval_interval": EVERY, "eval_hellaswag_every": EVERY, "tensorboard": False, "lora.export": False}
EXAMPLES = [("The function returns", [" a list.", " the value.", " None.", " an integer."]),
            ("A class is defined with", [" a keyword.", " a loop.", " two modules.", " an object."]),
            ("Use the import statement", [" for a module.", " for a file.", " at the end.", " with care."]),
            ("An exception is raised when", [" it fails.", " it is true.", " a list ends.", " a test."])]


def flags(wd: Path, data_dir: Path, hs: Path, max_iters: int) -> list[str]:
    more = {**RUN, "data.dir": data_dir, "hellaswag_path": hs, "max_iters": max_iters}
    return [str(wd), f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={wd}",
            *(f"--config.{k}={v}" for k, v in more.items())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=env, cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def pair(args: list[str], logs: Path, name: str, cache: Path, signal_again: bool = False) -> list[subprocess.Popen]:
    """Two processes of one run; with signal_again, process 1 signals itself when the stop's save starts."""
    port, procs = free_port(), []
    for i in range(2):
        env = xla_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                      JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      **({"SIGNAL_AGAIN_IN_SAVE": "1"} if signal_again and i == 1 else {}))
        procs.append(start(args, logs / f"{name}_{i}.log", env))
    return procs


def records(wd: Path) -> list[dict]:
    return metrics.read_metrics(wd / "metrics.jsonl") if (wd / "metrics.jsonl").is_file() else []


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pydoc_char_dir):
    """(stopped, resumed, reference, logs, facts): the two-process run stopped by a SIGTERM to process 1, its
    two-process resume to LAST and the one-process (two-device) run to LAST; facts: exit codes and timings."""
    root = tmp_path_factory.mktemp("multihost")
    hs = root / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps({"ctx": c, "endings": e, "label": i % 4}) + "\n"
                          for i, (c, e) in enumerate(EXAMPLES)))
    stopped, resumed, reference, logs = root / "stopped", root / "resumed", root / "reference", root / "logs"
    logs.mkdir()
    deadline, facts, procs = time.time() + TIMEOUT_S, {}, []
    try:
        ref = start(flags(reference, pydoc_char_dir, hs, LAST), logs / "reference.log", xla_env(2))
        procs = [ref, *pair(flags(stopped, pydoc_char_dir, hs, 10**6), logs, "stopped", root / "cache", True)]
        while not any(r.get("step", -1) >= STOP_AFTER for r in records(stopped) if r["kind"] == "train"):
            assert time.time() < deadline and all(p.poll() is None for p in procs[1:]), \
                (logs / "stopped_0.log").read_text()[-3000:]
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGTERM)
        t0 = time.time()
        facts["stopped_codes"] = wait_all(procs[1:], min(deadline, t0 + 60))
        facts["stop_s"] = time.time() - t0
        facts["ckpts_after_stop"] = sorted(p.name for p in (stopped / "checkpoints").iterdir())
        shutil.copytree(stopped, resumed)  # the stopped run stays as it was, for the assertions
        procs += pair(flags(resumed, pydoc_char_dir, hs, LAST), logs, "resumed", root / "cache")
        facts["resumed_codes"] = wait_all(procs[3:], deadline)
        facts["reference_code"] = ref.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return stopped, resumed, reference, logs, facts


def by_step(wd: Path, field: str) -> dict[int, float]:
    return {r["step"]: r[field] for r in records(wd) if field in r}


def stop_event(wd: Path) -> dict:
    (event,) = [r for r in records(wd) if str(r.get("event", "")).startswith("stopped by")]
    return event


def test_a_sigterm_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(runs):
    stopped, _, _, logs, facts = runs
    event = stop_event(stopped)
    assert event["event"] == "stopped by SIGTERM" and event["by"] == "SIGTERM (process 1 of 2)", event
    # both leave within 30 s, with status 0 (a stop that saved as planned), the same on both
    assert facts["stopped_codes"] == [0, 0] and facts["stop_s"] < 30, facts
    assert facts["ckpts_after_stop"] == [str(event["step"])], facts  # one step folder, written by both together
    assert STOP_AFTER < event["step"] < LAST, f"the stop landed at {event['step']}, past what the resume needs"
    assert max(by_step(stopped, "loss")) == event["step"] - 1, event  # logged steps are 0-based
    for i in range(2):
        log = (logs / f"stopped_{i}.log").read_text()
        assert f"SIGTERM (process 1 of 2): saved a checkpoint at step {event['step']}" in log, log[-3000:]


def test_a_second_signal_during_the_stop_s_save_does_not_cut_it_short(runs):
    stopped, _, _, logs, facts = runs
    log = (logs / "stopped_1.log").read_text()
    assert "SIGTERM again: the checkpoint is being written; the run exits as soon as it is complete" in log, log[-3000:]
    assert "KeyboardInterrupt" not in log and facts["stopped_codes"][1] == 0, log[-3000:]
    step = stop_event(stopped)["step"]
    assert {p.name for p in (stopped / "checkpoints" / str(step)).iterdir()} >= {"params", "optimizer"}


def test_the_resumed_run_continues_the_uninterrupted_one_bit_for_bit(runs):
    stopped, resumed, reference, _, facts = runs
    assert facts["resumed_codes"] == [0, 0] and facts["reference_code"] == 0, facts
    step = stop_event(stopped)["step"]
    assert [r["step"] for r in records(resumed) if r.get("event") == "resume"] == [step]
    want, got = by_step(reference, "loss"), by_step(resumed, "loss")
    assert sorted(got) == list(range(LAST)) and sorted(want) == list(range(LAST))  # steps 0 .. LAST - 1
    assert got == want  # bitwise: the steps before the stop come from the stopped run, the rest from the resume


def test_validation_loss_and_hellaswag_on_two_processes_are_those_of_one(runs):
    """The same program on the same mesh: bitwise equal (the all-reduces add two values either way)."""
    _, resumed, reference, _, _ = runs
    for field in ("val_loss", "train_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_loss"):
        want, got = by_step(reference, field), by_step(resumed, field)
        assert sorted(want) == list(range(EVERY, LAST + 1, EVERY)), (field, want)
        assert got == want, field
    assert all(r["hellaswag_n"] == len(EXAMPLES) for r in records(resumed) if "hellaswag_n" in r)


if __name__ == "__main__":  # one process of a run: train.py with argv[2:], optionally signalling itself in the save
    if os.environ.get("SIGNAL_AGAIN_IN_SAVE"):
        from jaxgpt.train import hooks

        save = hooks.checkpoint.save_run_step

        def save_after_a_second_signal(*a, **kw):
            os.kill(os.getpid(), signal.SIGTERM)
            return save(*a, **kw)

        hooks.checkpoint.save_run_step = save_after_a_second_signal
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
