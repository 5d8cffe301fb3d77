#!/usr/bin/env bash
# Delete the TPU VM (all its workers and their disks). Copy checkpoints to the bucket first.
#
# Usage: tpu_scripts/delete.sh [--dry-run] [--yes]
#   Without --yes, gcloud asks for confirmation.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
require_gcloud

extra=()
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --yes) extra+=(--quiet) ;;
    *) die "unexpected argument $a; use --yes to skip the confirmation" ;;
  esac
done
mapfile -t flags < <(tpu_flags)
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" ${extra[@]+"${extra[@]}"}
