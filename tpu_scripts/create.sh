#!/usr/bin/env bash
# Create the TPU VM or pod slice named in config.env.
#
# Usage: tpu_scripts/create.sh [--dry-run]
#   TPU_TYPE=v4-8 is one host with 4 chips; TPU_TYPE=v4-32 is a pod slice of 4 hosts.
#   TPU_SPOT=1 asks for a Spot VM.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "unexpected arguments: ${ARGS[*]}; settings go in config.env or TPU_* variables"
require_gcloud

mapfile -t flags < <(tpu_flags)
extra=()
[[ "$TPU_SPOT" == 1 ]] && extra+=(--spot)
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" "--accelerator-type=$TPU_TYPE" \
  "--version=$TPU_VERSION" "${extra[@]}"
