# shellcheck shell=bash source-path=SCRIPTDIR
# Helpers sourced by the tpu_scripts: configuration, --dry-run / --help handling, and `run`, which prints
# a command exactly (one line, shell-quoted) and executes it unless this is a dry run.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CONFIG_FILE="${JAXGPT_TPU_CONFIG:-$SCRIPT_DIR/config.env}"
if [[ ! -f "$CONFIG_FILE" ]]; then
  echo "error: config file $CONFIG_FILE not found; create it or unset JAXGPT_TPU_CONFIG" >&2
  exit 2
fi
# shellcheck source=config.env
source "$CONFIG_FILE"

DRY_RUN=0
ARGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

# Print the comment block at the top of the calling script (after the shebang) as its usage.
usage() {
  awk 'NR == 1 { next } /^# shellcheck/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

# Split the script's arguments into --dry-run / --help and the rest (left in ARGS).
parse_common() {
  local a
  for a in "$@"; do
    case "$a" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) ARGS+=("$a") ;;
    esac
  done
}

# One argument, quoted only when the shell needs it: 'single' quotes, else "double" quotes when nothing in
# it expands, else single quotes with each ' written as '\''. A --flag=value keeps its --flag= outside.
quote() {
  local s="$1" prefix=""
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
    return
  fi
  if [[ "$s" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    s="${BASH_REMATCH[2]}"
  fi
  if [[ "$s" != *"'"* ]]; then
    printf "%s'%s'" "$prefix" "$s"
  elif [[ "$s" != *[\"\$\`\\!]* ]]; then
    printf '%s"%s"' "$prefix" "$s"
  else
    local q="'\\''"
    printf "%s'%s'" "$prefix" "${s//\'/$q}"
  fi
}

# A whole command on one line, each argument quoted as needed.
print_cmd() {
  local out=() a
  for a in "$@"; do
    out+=("$(quote "$a")")
  done
  printf '%s\n' "${out[*]}"
}

# Print the command; run it unless --dry-run. Dry runs print to stdout, real runs echo to stderr with "+ ".
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "$@"
  else
    printf '+ %s\n' "$(print_cmd "$@")" >&2
    "$@"
  fi
}

require() {
  local name="$1" hint="$2"
  [[ -n "${!name:-}" ]] || die "$name is empty; $hint"
}

require_gcloud() {
  require TPU_PROJECT "set it in $CONFIG_FILE or the environment (your Google Cloud project id)"
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null; then
    die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
  fi
}

require_bucket_url() {
  [[ "$1" == gs://* ]] || die "$1 is not a bucket URL; use gs://bucket/path (or set TPU_BUCKET)"
}

# Flags every `gcloud compute tpus tpu-vm` call takes.
tpu_flags() {
  printf '%s\n' "--project=$TPU_PROJECT" "--zone=$TPU_ZONE"
}

# gcloud compute tpus tpu-vm ssh on WORKER ("all" or an index), running COMMAND there.
tpu_ssh() {
  local worker="$1" command="$2" flags
  mapfile -t flags < <(tpu_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$worker" "--command=$command"
}
