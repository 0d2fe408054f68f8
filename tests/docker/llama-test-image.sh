#!/usr/bin/env bash
# A minimal llama.cpp image for the orchestrator tests, built FROM the local
# base image with this machine's prebuilt llama.cpp bin directory copied in
# (no compile, no registry). It stands in for images/llama.cpp's image: same
# pinned build, the same entrypoint (images/llama.cpp/entrypoint.sh: the role is the
# first argument; rpc-server runs with SIGPIPE ignored) under tini.
#
#   tests/docker/llama-test-image.sh [IMAGE]    build it unless already current;
#                                               prints the image name
#
# IMAGE defaults to tightwad-test/llama.cpp:cpu. The base image is
# $TIGHTWAD_BASE_IMAGE (default tightwad-local/debian:bookworm-slim, made by
# tests/docker/dockerd.sh up). The image is rebuilt when the bin directory,
# the base image, the entrypoint or this script changes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${1:-tightwad-test/llama.cpp:cpu}
base=${TIGHTWAD_BASE_IMAGE:-tightwad-local/debian:bookworm-slim}
bin=$("$here/../../images/llama.cpp/build.sh" --print-dir | tail -n 1)
key="$(basename "$(dirname "$(dirname "$bin")")")@$(docker image inspect -f '{{.Id}}' "$base")"
key="$key@$(sha256sum "$here/../../images/llama.cpp/entrypoint.sh" "$0" | sha256sum | cut -c1-12)"

if [ "$(docker image inspect -f '{{index .Config.Labels "io.tightwad.test-image"}}' "$image" 2>/dev/null || true)" = "$key" ]; then
  echo "$image"
  exit 0
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/stack"
cp -a "$bin"/. "$ctx/bin/"
# The image contract of images/llama.cpp: tini, and its entrypoint, which picks the
# role from the first argument and runs rpc-server with SIGPIPE ignored.
cp "$here/../../images/llama.cpp/entrypoint.sh" "$ctx/stack/entrypoint.sh"
cp -L "$(command -v docker-init)" "$ctx/stack/tini"
# OpenMP runtime: the base image is minbase; this machine is the same Debian.
cp -L "$(ldconfig -p | awk '/libgomp.so.1 .*x86-64/{print $NF; exit}')" "$ctx/lib/libgomp.so.1"
cat >"$ctx/Dockerfile" <<DOCKERFILE
ARG BASE_IMAGE
FROM \${BASE_IMAGE}
COPY lib/ /usr/local/lib/
COPY bin/ /opt/llama.cpp/bin/
COPY stack/ /opt/tightwad/stack/
RUN ldconfig && ln -sf ggml-rpc-server /opt/llama.cpp/bin/rpc-server \
 && mv /opt/tightwad/stack/tini /usr/bin/tini && chmod 0755 /usr/bin/tini /opt/tightwad/stack/entrypoint.sh
ENV PATH=/opt/llama.cpp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/llama.cpp/bin \
    TIGHTWAD_LLAMA_BIN=/opt/llama.cpp/bin
LABEL io.tightwad.test-image="$key"
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/tightwad/stack/entrypoint.sh"]
CMD ["help"]
DOCKERFILE
docker build -q --build-arg "BASE_IMAGE=$base" -t "$image" "$ctx" >/dev/null
echo "$image"
