#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run).
# Every command that touches a machine goes through `run`: it prints the exact command
# (shell-quoted, copy-pasteable) and executes it unless DRY_RUN=1.

DRY_RUN="${DRY_RUN:-0}"

# One argument, quoted for a POSIX shell only when it needs it ('...' with ' written as '\'').
shell_quote() {
  case "$1" in
    "" ) printf "''" ;;
    *[!A-Za-z0-9_./:=,@%+-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# All arguments quoted and joined by spaces (for remote shells: ssh --command, srun bash -c).
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+=" $(shell_quote "$arg")"
  done
  printf '%s' "${out# }"
}

run() {
  printf '+ %s\n' "$(quote_args "$@")"
  if [ "$DRY_RUN" != 1 ]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# The script's help is its header: the comment block under the shebang, up to the first code line.
usage() {
  awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"
  exit "${1:-0}"
}

# check_command WORD COMMAND...: returns when WORD (a script's first argument) is one of the
# COMMANDs; prints the help for help words (exit 0) or none (exit 2), and stops on anything else.
check_command() {
  local word="$1" known
  shift
  [ -n "$word" ] || usage 2
  case "$word" in
    -h|--help|help) usage 0 ;;
  esac
  for known in "$@"; do
    if [ "$word" = "$known" ]; then
      return 0
    fi
  done
  local list
  list="$(printf ', %s' "$@")"
  die "unknown command '$word' (${list#, })"
}

# The JAX of setup.py with an accelerator extra (tpu, cuda12, cuda13); versions must match exactly.
jax_spec() {
  printf 'jax[%s]>=0.10.2,<0.11' "$1"
}
