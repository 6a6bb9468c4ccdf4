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

# The JAX of setup.py with an accelerator extra (tpu, cuda12, cuda13); versions must match exactly.
jax_spec() {
  printf 'jax[%s]>=0.10.2,<0.11' "$1"
}
