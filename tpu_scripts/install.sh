#!/usr/bin/env bash
# Install jaxgpt and JAX for TPU on every worker of the TPU VM.
#
# Usage: tpu_scripts/install.sh [--dry-run]
#   With TPU_GIT_URL empty (the default) the committed state of this checkout (git archive HEAD) is copied
#   to each worker and unpacked over ~/$TPU_REMOTE_DIR (other files there are kept); uncommitted changes are
#   not included. With TPU_GIT_URL set, each worker clones it (or fetches TPU_GIT_REF into an earlier clone;
#   a checkout with local edits makes this step stop rather than overwrite them).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "unexpected arguments: ${ARGS[*]}"
require_gcloud

dir="$(quote "$TPU_REMOTE_DIR")"
pip_install="python3 -m pip install -U $(quote "$TPU_JAX") && python3 -m pip install -e $dir'[gcs]'"  # gcsfs: gs:// workdirs
if [[ -z "$TPU_GIT_URL" ]]; then
  tarball="${TMPDIR:-/tmp}/jaxgpt-src.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
  mapfile -t flags < <(tpu_flags)
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxgpt-src.tar.gz" "${flags[@]}" --worker=all
  tpu_ssh all "set -e; mkdir -p $dir && tar -xzf jaxgpt-src.tar.gz -C $dir && $pip_install"
else
  ref="$(quote "$TPU_GIT_REF")"
  update="git -C $dir fetch --depth 1 origin $ref && git -C $dir checkout FETCH_HEAD"
  clone="git clone --depth 1 --branch $ref $(quote "$TPU_GIT_URL") $dir"
  tpu_ssh all "set -e; if [ -d $dir/.git ]; then $update; else $clone; fi; $pip_install"
fi
tpu_ssh all "python3 -c 'import jax, jaxgpt; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
