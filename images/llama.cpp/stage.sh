#!/usr/bin/env bash
# Put local inputs for the llama.cpp image into images/llama.cpp/local/ (ignored
# by git; see local/README.md), so that image builds need no download and,
# with LLAMA_SOURCE=prebuilt, no compile.
#
#   stage.sh sdist            the pinned llama-cpp-python sdist (from build.sh's cache)
#   stage.sh prebuilt [BACKEND]
#                             the host's build of the pin (build.sh --print-dir) plus
#                             the sdist; bin/.pin records commit and backend
#   stage.sh src DIR          a llama.cpp source tree, for LLAMA_SOURCE=local
#   stage.sh clean            remove everything staged
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pin.env
. "$here/pin.env"
local_dir="$here/local"
say() { printf '[stage.sh] %s\n' "$*" >&2; }

sdist() {
  local src
  src=$("$here/build.sh" --fetch-only | tail -n 1)
  if ! cmp -s "$src" "$local_dir/$(basename "$src")"; then
    cp "$src" "$local_dir/"
  fi
  say "sdist: $local_dir/$(basename "$src")"
}

prebuilt() {
  local backend=${1:-cpu} bin
  if ! bin=$("$here/build.sh" --backend "$backend" --print-dir); then
    echo "stage.sh: llama.cpp ($backend) is not built on this host yet: run images/llama.cpp/build.sh --backend $backend" >&2
    exit 1
  fi
  rm -rf "$local_dir/bin.new"
  mkdir -p "$local_dir/bin.new"
  cp -a "$bin"/llama-server "$bin"/ggml-rpc-server "$bin"/lib*.so* "$local_dir/bin.new/"
  printf 'LLAMA_CPP_COMMIT=%s\nBACKEND=%s\nFROM=%s\n' "$LLAMA_CPP_COMMIT" "$backend" "$bin" \
    >"$local_dir/bin.new/.pin"
  rm -rf "$local_dir/bin"
  mv "$local_dir/bin.new" "$local_dir/bin"
  say "prebuilt ($backend): $local_dir/bin from $bin"
  sdist
}

src() {
  local dir=${1:?usage: stage.sh src DIR}
  [ -f "$dir/CMakeLists.txt" ] || { echo "stage.sh: $dir has no CMakeLists.txt" >&2; exit 1; }
  rm -rf "$local_dir/llama.cpp"
  mkdir -p "$local_dir/llama.cpp"
  tar -C "$dir" --exclude=./build --exclude=./.git -cf - . | tar -C "$local_dir/llama.cpp" -xf -
  say "source tree: $local_dir/llama.cpp from $dir"
}

clean() {
  find "$local_dir" -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
  say "cleaned $local_dir"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  sdist|prebuilt|src|clean) "$cmd" "$@" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
