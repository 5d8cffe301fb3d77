#!/usr/bin/env bash
# Copy checkpoints (run directories) between this machine, the TPU VM and a Cloud Storage bucket.
#
# Usage: tpu_scripts/checkpoints.sh [--dry-run] COMMAND ARGS
#   upload LOCAL_DIR [gs://DEST]     this machine -> bucket (default DEST: $TPU_BUCKET/checkpoints/)
#   download gs://SRC LOCAL_DIR      bucket -> this machine (e.g. to sample from a run)
#   push REMOTE_DIR [gs://DEST]      worker 0 of the TPU VM -> bucket (single-host runs with a local workdir)
#   pull gs://SRC REMOTE_DIR         bucket -> every worker (to resume or fine-tune from it)
#   REMOTE_DIR is relative to the home directory on the workers.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
[[ $# -ge 1 ]] || die "no command; use upload, download, push or pull (see --help)"

default_dest() {
  require TPU_BUCKET "give a gs:// destination or set TPU_BUCKET in config.env"
  printf '%s' "${TPU_BUCKET%/}/checkpoints/"
}

cmd="$1"
shift
case "$cmd" in
  upload)
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: checkpoints.sh upload LOCAL_DIR [gs://DEST]"
    [[ -d "$1" || "$DRY_RUN" == 1 ]] || die "$1 is not a directory; pass the run directory to upload"
    dest="${2:-$(default_dest)}"
    require_bucket_url "$dest"
    run gcloud storage cp --recursive "$1" "$dest"
    ;;
  download)
    [[ $# -eq 2 ]] || die "usage: checkpoints.sh download gs://SRC LOCAL_DIR"
    require_bucket_url "$1"
    run mkdir -p "$2"
    run gcloud storage cp --recursive "$1" "$2"
    ;;
  push)
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: checkpoints.sh push REMOTE_DIR [gs://DEST]"
    require_gcloud
    dest="${2:-$(default_dest)}"
    require_bucket_url "$dest"
    tpu_ssh 0 "gcloud storage cp --recursive $(quote "$1") $(quote "$dest")"
    ;;
  pull)
    [[ $# -eq 2 ]] || die "usage: checkpoints.sh pull gs://SRC REMOTE_DIR"
    require_gcloud
    require_bucket_url "$1"
    tpu_ssh all "mkdir -p $(quote "$2") && gcloud storage cp --recursive $(quote "$1") $(quote "$2")"
    ;;
  *) die "unknown command $cmd; use upload, download, push or pull" ;;
esac
