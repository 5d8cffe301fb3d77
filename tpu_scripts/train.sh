#!/usr/bin/env bash
# Launch train.py on every host of the TPU VM at once (one JAX process per host).
#
# Usage: tpu_scripts/train.sh [--dry-run] [--background] --config=configs/<name>.py [--workdir=gs://...] [flags]
#   Every argument except --dry-run and --background goes to train.py unchanged, e.g. --config.mesh.fsdp=4.
#   Without --workdir, the run directory is $TPU_BUCKET/runs/$TPU_NAME. Pod slices (several hosts) need a
#   gs:// workdir: all hosts write parts of the same checkpoint.
#   --background detaches the run (nohup) and writes ~/$TPU_REMOTE_DIR/train.log on each host.
#   JAXGPT_DISTRIBUTED=1 makes train.py call jax.distributed.initialize(), which finds the other hosts.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
require_gcloud

background=0
train_args=()
has_config=0
has_workdir=0
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --background) background=1 ;;
    *)
      [[ "$a" == --config=* || "$a" == --config ]] && has_config=1
      [[ "$a" == --workdir=* || "$a" == --workdir ]] && has_workdir=1
      train_args+=("$a")
      ;;
  esac
done
[[ "$has_config" == 1 ]] || die "train.sh needs --config=configs/<name>.py (passed on to train.py)"
if [[ "$has_workdir" == 0 ]]; then
  require TPU_BUCKET "pass --workdir=gs://bucket/run or set TPU_BUCKET in config.env"
  require_bucket_url "$TPU_BUCKET"
  train_args+=("--workdir=${TPU_BUCKET%/}/runs/$TPU_NAME")
fi

train="JAXGPT_DISTRIBUTED=1 python3 train.py"
for a in "${train_args[@]}"; do
  train+=" $(quote "$a")"
done
dir="$(quote "$TPU_REMOTE_DIR")"
if [[ "$background" == 1 ]]; then
  tpu_ssh all "cd $dir && (nohup env $train > train.log 2>&1 &)"
else
  tpu_ssh all "cd $dir && $train"
fi
