"""The documentation's commands name configs that exist: every config file path in README.md, docs/*.md,
tpu_scripts/ (its README and scripts) and experiments/ is a file of the repository, and every `--config.KEY=`
override they show is a key of the config it goes with (the one named on the same command, else the default)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from jaxgpt.train import config as train_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/default.py"
CONFIG_PATH = re.compile(r"--config=([^\s`'\"\]):<>]+\.py)|(?<![\w/.])(configs/[\w/]+\.py)")  # not <name>.py
OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)=")
PLACEHOLDER_KEYS = {"x"}  # docs/architecture.md explains the syntax with `--config.x=y`


def documents() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "tpu_scripts").iterdir()),
             *sorted((REPO / "experiments").rglob("*.py"))]
    return [f for f in files if f.is_file()]


def commands(text: str) -> list[str]:
    """Lines with backslash continuations joined, so a command's flags stay together."""
    return re.sub(r"\\\n", " ", text).splitlines()


def config_paths(line: str) -> list[str]:
    return [a or b for a, b in CONFIG_PATH.findall(line)]


def test_every_config_path_the_docs_name_exists():
    named = {(f.relative_to(REPO), p) for f in documents() for p in config_paths(f.read_text(encoding="utf-8"))}
    assert {p for _, p in named} >= {"configs/gpt2_124m.py", "configs/tiny.py", "configs/finetune_lora.py"}
    assert {f for f, _ in named} >= {Path("README.md"), Path("tpu_scripts/README.md"), Path("docs/scale.md")}
    missing = sorted(f"{f}: {p}" for f, p in named if not (REPO / p).is_file())
    assert not missing, f"config files named in the docs that do not exist: {missing}"


def test_every_config_override_the_docs_show_is_a_key_of_its_config(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(REPO), *sys.path])  # as for `python train.py`: `from configs import ...`
    loaded, checked, wrong = {}, 0, []
    for f in documents():
        for line in commands(f.read_text(encoding="utf-8")):
            overrides = [k for k in OVERRIDE.findall(line) if k not in PLACEHOLDER_KEYS]
            if not overrides:
                continue
            path = (config_paths(line) or [DEFAULT_CONFIG])[0]
            if path not in loaded:
                loaded[path] = train_config.load_config_file(str(REPO / path))
            try:
                train_config.check_override_keys(loaded[path], [f"--config.{k}=0" for k in overrides])
            except ValueError as e:
                wrong.append(f"{f.relative_to(REPO)} ({path}): {e}")
            checked += len(overrides)
    assert checked >= 40 and len(loaded) >= 4, (checked, sorted(loaded))
    assert not wrong, "\n".join(wrong)
