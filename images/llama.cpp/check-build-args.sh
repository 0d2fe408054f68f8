#!/bin/sh
# First step of the llama.cpp image build: refuse bad build arguments with a
# message that names them (they come from .env through compose.yaml).
set -eu
fail() { echo "error: $*" >&2; exit 1; }
case "${BACKEND:-}" in
  cpu) ;;
  cuda) command -v nvcc >/dev/null ||
          fail "BACKEND=cuda needs a CUDA devel BUILD_IMAGE (nvidia/cuda:*-devel-*): use compose.cuda.yaml, which sets it" ;;
  rocm) command -v hipconfig >/dev/null ||
          fail "BACKEND=rocm needs a ROCm BUILD_IMAGE (rocm/dev-ubuntu-*): use compose.rocm.yaml, which sets it" ;;
  *) fail "BACKEND=${BACKEND:-}: expected cpu, cuda or rocm (set BACKEND in .env)" ;;
esac
case "${LLAMA_SOURCE:-}" in
  pypi|local|prebuilt) ;;
  *) fail "LLAMA_SOURCE=${LLAMA_SOURCE:-}: expected pypi, local or prebuilt" ;;
esac
case "${CPU_ISA:-}" in
  sse42|avx|avx2|avx512) ;;
  *) fail "CPU_ISA=${CPU_ISA:-}: expected sse42, avx, avx2 or avx512" ;;
esac
echo "building llama.cpp: BACKEND=$BACKEND LLAMA_SOURCE=$LLAMA_SOURCE CPU_ISA=$CPU_ISA"
