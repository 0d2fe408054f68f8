#!/usr/bin/env bash
# A second, independent Docker daemon on this machine: the "remote host" of the
# orchestrator tests (tests/test_orchestrator_docker.py).
#
#   tests/docker/second-daemon.sh up       start it (idempotent); prints its endpoint
#   tests/docker/second-daemon.sh down     stop it (by PID) and remove its bridge
#   tests/docker/second-daemon.sh status   say what is there
#   tests/docker/second-daemon.sh load IMAGE...
#                                          copy images from the main daemon
#                                          (docker save | docker -H ... load)
#
# It has its own data-root, exec-root, pid file, unix socket and TCP endpoint
# (tcp://127.0.0.1:$TIGHTWAD_D2_PORT, no TLS: loopback only, test use only),
# and its own bridge $TIGHTWAD_D2_BRIDGE with address $TIGHTWAD_D2_ADDRESS. That
# bridge address is the host's "cluster address": containers publish their RPC
# ports there, and containers of the main daemon reach them through the host.
# --iptables=false keeps it from rewriting the main daemon's rules; its
# containers get no egress (the tests need none).
#
# Everything lives under $TIGHTWAD_D2_DIR (default ~/.cache/tightwad/docker2);
# the data-root survives between runs, so loaded images are cached.
set -euo pipefail

DIR=${TIGHTWAD_D2_DIR:-$HOME/.cache/tightwad/docker2}
PORT=${TIGHTWAD_D2_PORT:-23751}
BRIDGE=${TIGHTWAD_D2_BRIDGE:-br-tightwad2}
ADDRESS=${TIGHTWAD_D2_ADDRESS:-10.231.0.1}
POOL=${TIGHTWAD_D2_POOL:-10.232.0.0/16}
ENDPOINT="tcp://127.0.0.1:$PORT"
SOCK="$DIR/docker.sock"

say() { printf '[second-daemon.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
wait_for() {
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "second-daemon.sh: timed out waiting for: $*" >&2; return 1
}
running_pid() {
  local f="$DIR/dockerd.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

up() {
  command -v dockerd >/dev/null || { echo "second-daemon.sh: dockerd is not installed (run tests/docker/dockerd.sh up)" >&2; exit 1; }
  if running_pid >/dev/null && docker -H "$ENDPOINT" version >/dev/null 2>&1; then
    say "already running: $ENDPOINT (bridge $BRIDGE, $ADDRESS)"
    echo "$ENDPOINT"
    return 0
  fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$ADDRESS/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  mkdir -p "$DIR"
  say "starting dockerd on $ENDPOINT (data-root $DIR/data, bridge $BRIDGE)"
  # setsid: the daemon outlives this script and the test process that ran it.
  setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$DIR/dockerd.pid" \
    -H "unix://$SOCK" -H "$ENDPOINT" --bridge="$BRIDGE" --iptables=false --ip-masq=false \
    --default-address-pool "base=$POOL,size=24" >"$DIR/dockerd.log" 2>&1 </dev/null &
  wait_for docker -H "$ENDPOINT" version || { tail -n 30 "$DIR/dockerd.log" >&2; exit 1; }
  say "ready: $ENDPOINT"
  echo "$ENDPOINT"
}

down() {
  local pid
  if pid=$(running_pid); then
    say "stopping dockerd (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd $pid did not stop; SIGKILL"; kill -9 "$pid"; }
  fi
  rm -f "$DIR/dockerd.pid"
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
    say "removed bridge $BRIDGE"
  fi
}

status() {
  if running_pid >/dev/null && docker -H "$ENDPOINT" version >/dev/null 2>&1; then
    echo "second daemon: $ENDPOINT ($(docker -H "$ENDPOINT" version --format '{{.Server.Version}}'))"
  else
    echo "second daemon: not running"
  fi
  ip -br addr show "$BRIDGE" 2>/dev/null || echo "bridge $BRIDGE: absent"
}

load() {
  local image
  for image in "$@"; do
    if [ "$(docker image inspect -f '{{.Id}}' "$image")" = \
         "$(docker -H "$ENDPOINT" image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)" ]; then
      continue
    fi
    say "copying $image to $ENDPOINT"
    docker save "$image" | docker -H "$ENDPOINT" load >/dev/null
  done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  load) shift; load "$@" ;;
  *) echo "usage: $0 up|down|status|load IMAGE..." >&2; exit 2 ;;
esac
