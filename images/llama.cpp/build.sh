#!/usr/bin/env bash
# Build the pinned llama.cpp (pin.env beside this file): llama-server, the RPC
# server and libllama, for one backend. The result is cached, keyed by commit,
# backend, flags and (for native CPU builds) the host's instruction set, so a
# second run with the same inputs finishes in well under a second.
#
#   build.sh [--backend cpu|cuda|rocm] [--src DIR] [--cache DIR] [--print-dir]
#            [--extra-flags "..."] [--cpu-isa host|sse42|avx|avx2|avx512] [--fetch-only]
#
# --src DIR    use a local llama.cpp tree instead of the PyPI sdist
# --cpu-isa L  x86 instruction set of ggml's CPU code: host (default: this CPU's
#              SSE/AVX/AVX-512 for cpu builds) or a portable baseline for every
#              backend (container images); never AMX
# --fetch-only download and check the pinned sdist, print its path, and exit
# --print-dir  print the bin directory of the (possibly cached) build and exit 0
#              when it is complete, 1 when it is not built yet
#
# The last line printed on success is the bin directory, which holds
# llama-server, ggml-rpc-server (and an rpc-server link) and libllama.so.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pin.env
. "$here/pin.env"

backend=cpu
src=""
cache="${TIGHTWAD_CACHE:-$HOME/.cache/tightwad}"
print_dir=0
fetch_only=0
extra_flags="${LLAMA_CPP_EXTRA_FLAGS:-}"
cpu_isa="${LLAMA_CPP_CPU_ISA:-host}"
jobs="${JOBS:-$(nproc)}"

while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --extra-flags) extra_flags="$2"; shift 2 ;;
    --cpu-isa) cpu_isa="$2"; shift 2 ;;
    --print-dir) print_dir=1; shift ;;
    --fetch-only) fetch_only=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

case "$backend" in
  cpu) backend_flags="$LLAMA_CPP_CMAKE_FLAGS_CPU" ;;
  cuda) backend_flags="$LLAMA_CPP_CMAKE_FLAGS_CUDA" ;;
  rocm) backend_flags="$LLAMA_CPP_CMAKE_FLAGS_ROCM" ;;
  *) echo "build.sh: --backend must be cpu, cuda or rocm, not '$backend'" >&2; exit 2 ;;
esac

case "$cpu_isa" in
  host|sse42|avx|avx2|avx512) ;;
  *) echo "build.sh: --cpu-isa must be host, sse42, avx, avx2 or avx512, not '$cpu_isa'" >&2; exit 2 ;;
esac

# x86 vector extensions as ggml options (see pin.env on AMX): the host's, or
# the baseline named by --cpu-isa (avx2 = x86-64-v3, avx512 = x86-64-v4).
host_isa_flags() {
  [ "$(uname -m)" = x86_64 ] || return 0
  local have out="" f opt
  case "$cpu_isa" in
    host) have=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) " ;;
    sse42) have=" sse4_2 " ;;
    avx) have=" sse4_2 avx " ;;
    avx2) have=" sse4_2 avx avx2 fma f16c bmi2 " ;;
    avx512) have=" sse4_2 avx avx2 fma f16c bmi2 avx512f " ;;
  esac
  for f in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
           avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    opt="OFF"
    case "$have" in *" ${f%%:*} "*) opt=ON ;; esac
    out="$out -DGGML_${f##*:}=$opt"
  done
  echo "$out -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

flags="$LLAMA_CPP_CMAKE_FLAGS $backend_flags"
if [ "$cpu_isa" != host ]; then
  # A portable baseline, whatever the backend (GPU builds are native otherwise).
  case "$backend_flags" in *GGML_NATIVE=OFF*) ;; *) flags="$flags -DGGML_NATIVE=OFF" ;; esac
  flags="$flags $(host_isa_flags)"
elif [ "$backend" = cpu ]; then
  case "$extra_flags" in
    *GGML_NATIVE=ON*) ;;
    *) flags="$flags $(host_isa_flags)" ;;
  esac
fi
flags="$flags $extra_flags"
# A native build only runs on CPUs with the same instruction set.
isa=""
case "$flags" in
  *GGML_NATIVE=ON*) isa=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-8) ;;
esac
source_id="$LLAMA_CPP_COMMIT"
if [ -n "$src" ]; then
  src=$(cd "$src" && pwd)
  source_id="local-$(printf '%s' "$src" | sha256sum | cut -c1-8)"
fi
key=$(printf '%s|%s|%s|%s' "$source_id" "$backend" "$flags" "$isa" | sha256sum | cut -c1-12)
out="$cache/llama.cpp/$source_id-$backend-$key"
bin="$out/build/bin"

step() { printf '[build-llama %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

sdist="$cache/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fetch_sdist() {
  if [ ! -f "$sdist" ] || ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    step "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI (77 MB)"
    mkdir -p "$cache/src"
    rm -f "$sdist"
    python3 -m pip download --no-deps --no-binary llama-cpp-python --progress-bar on \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$cache/src" >&2
  fi
  if ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    echo "build.sh: sha256 of $sdist does not match pin.env ($LLAMA_CPP_PYTHON_SHA256)" >&2
    exit 1
  fi
}
if [ "$fetch_only" = 1 ]; then
  fetch_sdist
  echo "$sdist"
  exit 0
fi

if [ -f "$out/.complete" ]; then
  [ "$print_dir" = 1 ] || echo "llama.cpp $source_id ($backend): cached build in $out" >&2
  echo "$bin"
  exit 0
fi
if [ "$print_dir" = 1 ]; then
  echo "$bin"
  exit 1
fi

if [ -z "$src" ]; then
  fetch_sdist
  step "unpacking vendor/llama.cpp ($LLAMA_CPP_COMMIT)"
  rm -rf "$out/src"
  mkdir -p "$out/src"
  tar -xzf "$sdist" -C "$out/src" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  src="$out/src"
fi

generator="Unix Makefiles"
command -v ninja >/dev/null && generator=Ninja
step "configuring ($backend): $flags"
# shellcheck disable=SC2086
cmake -S "$src" -B "$out/build" -G "$generator" $flags >"$out/configure.log" 2>&1 || {
  tail -n 30 "$out/configure.log" >&2; echo "build.sh: cmake configure failed, see $out/configure.log" >&2; exit 1; }
step "compiling $LLAMA_CPP_TARGETS with $jobs jobs (about 9 minutes on 2 CPU cores)"
# shellcheck disable=SC2086
cmake --build "$out/build" -j "$jobs" --target $LLAMA_CPP_TARGETS 2>&1 \
  | tee "$out/build.log" \
  | grep --line-buffered -E '^\[[0-9]+/[0-9]+\]' \
  | awk '{ split($1, a, /[\[\/\]]/); pct = int(100 * a[2] / a[3]);
        if (pct >= last + 10 || a[2] == a[3]) { printf("[build-llama] %3d%% (%s of %s steps)\n", pct, a[2], a[3]) > "/dev/stderr"; fflush("/dev/stderr"); last = pct } }' \
  || true
if [ ! -x "$bin/llama-server" ] || [ ! -x "$bin/ggml-rpc-server" ] || ! ls "$bin"/libllama.so* >/dev/null 2>&1; then
  tail -n 40 "$out/build.log" >&2
  echo "build.sh: build failed, see $out/build.log" >&2
  exit 1
fi
ln -sf ggml-rpc-server "$bin/rpc-server"
touch "$out/.complete"
step "done: $bin"
echo "$bin"
