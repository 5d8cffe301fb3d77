"""Train a GPT: `python train.py [--config=configs/default.py] [--config.max_iters=2000 ...] [--workdir=DIR]`.

With no arguments it trains the default config (a small character model on the documentation text that ships
with Python), offline, in a few minutes on a laptop CPU, then prints a sample. Rerunning the same command
resumes from the latest checkpoint in the workdir. On GPU and TPU, compiled steps are cached in
~/.cache/jaxgpt/xla (--config.compilation_cache_dir='' turns that off; on CPU
--config.compilation_cache_on_cpu=True turns it on), so reruns and resumes start without compiling. The loop
lives in `jaxgpt.train.trainer`, the settings and their defaults in `jaxgpt.train.config`.

Every device takes part (config.mesh: data parallel by default, --config.mesh.fsdp=N shards the parameters).
LoRA fine-tuning: `--config=configs/finetune_lora.py --config.init_path=<Hugging Face GPT-2 dir>`.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgpt import sharding
from jaxgpt.io import lock as workdir_lock
from jaxgpt.io import paths
from jaxgpt.train import compilation_cache, host_memory, trainer
from jaxgpt.train import config as train_config

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "default.py")
try:  # ml_collections reads the overrides when the flag is defined: refuse unknown keys first, in one line
    train_config.check_override_keys_in_argv(sys.argv[1:], DEFAULT_CONFIG)
except ValueError as e:
    raise SystemExit(f"train.py: {e}") from None
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG,
    "ml_collections config file; override fields with --config.<field>=<value>")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); default workdirs/<config name>")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or str(Path("workdirs") / Path(config_path.split(":")[0]).stem)
    train_cfg = _CONFIG.value
    if train_cfg.retain_host_memory:
        host_memory.retain_freed_memory()  # before XLA starts its threads (they would keep their own heaps)
    sharding.maybe_initialize_distributed()  # multi-host runs (from the environment); before any device use
    compilation_cache.enable_for_training(train_cfg.compilation_cache_dir, train_cfg.compilation_cache_min_secs,
                                          on_cpu=train_cfg.compilation_cache_on_cpu)
    try:
        trainer.train(train_cfg, workdir)
    except (workdir_lock.WorkdirLocked, paths.MissingBackend) as e:  # held, or a bucket without its package
        raise SystemExit(f"train.py: {e}") from None
    # a run stopped by SIGTERM / SIGINT has saved its state and exits 0 too, on every process: a preemption
    # handled as planned is not an error; the log's "stopped by" event and the printed line say to rerun
    return 0


if __name__ == "__main__":
    app.run(main)
