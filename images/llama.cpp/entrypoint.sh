#!/bin/sh
# Entry point of the tightwad/llama.cpp image: the first argument picks the role.
#   llama-server ARGS   llama.cpp's server (the draft, or a stock target)
#   rpc-server ARGS     a llama.cpp RPC worker; SIGPIPE is ignored, because a
#                       client giving up would otherwise kill it silently
#   verifier ARGS       Tightwad's verifier (tightwad verifier ARGS); adds
#                       --strict when TIGHTWAD_MODE=strict and --n-gpu-layers
#                       from LLAMA_ARG_N_GPU_LAYERS (llama-server reads that
#                       variable itself), unless ARGS already say so
#   help                this text
#   anything else       run as given
set -eu

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo "This image (binaries in ${TIGHTWAD_LLAMA_BIN:-?}):"
  sed 's/^/  /' /opt/llama.cpp/BUILD 2>/dev/null || true
}

has() {  # has FLAG ARGS...: is FLAG among ARGS?
  flag=$1; shift
  for arg in "$@"; do [ "$arg" = "$flag" ] && return 0; done
  return 1
}

role=${1:-help}
[ $# -gt 0 ] && shift
case "$role" in
  llama-server) exec llama-server "$@" ;;
  rpc-server|ggml-rpc-server) trap '' PIPE; exec ggml-rpc-server "$@" ;;
  verifier)
    if [ "${TIGHTWAD_MODE:-}" = strict ] && ! has --strict "$@"; then
      set -- "$@" --strict
    fi
    if [ -n "${LLAMA_ARG_N_GPU_LAYERS:-}" ] && ! has --n-gpu-layers "$@" && ! has -ngl "$@"; then
      set -- "$@" --n-gpu-layers "$LLAMA_ARG_N_GPU_LAYERS"
    fi
    exec tightwad verifier "$@" ;;
  help|-h|--help) usage ;;
  *) exec "$role" "$@" ;;
esac
