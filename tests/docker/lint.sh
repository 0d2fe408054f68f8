#!/usr/bin/env bash
# Static checks of the container side (make lint):
#   hadolint on every Dockerfile (settings in images/hadolint.yaml), and
#   `docker compose config -q` on every combination of compose files, with the
#   defaults and with .env.example.
# HADOLINT names the hadolint binary (default: hadolint on PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
HADOLINT=${HADOLINT:-hadolint}

mapfile -t dockerfiles < <(find images tests/docker -name Dockerfile -o -name '*.Dockerfile' | sort)
echo "hadolint: ${dockerfiles[*]}"
"$HADOLINT" --config images/hadolint.yaml "${dockerfiles[@]}"

bash tests/docker/dockerd.sh tools >/dev/null
combos=(
  "compose.yaml"
  "compose.yaml compose.cuda.yaml"
  "compose.yaml compose.rocm.yaml"
  "compose.yaml compose.cuda.yaml compose.rocm.yaml"
  "compose.yaml tests/compose.offline.yaml"
)
# Only the files named: no .env or COMPOSE_* from the caller.
clean=(env -u COMPOSE_FILE -u COMPOSE_PROJECT_NAME -u COMPOSE_PROFILES)
for combo in "${combos[@]}"; do
  args=()
  for f in $combo; do args+=(-f "$f"); done
  for envfile in /dev/null .env.example; do
    "${clean[@]}" docker compose --env-file "$envfile" "${args[@]}" config -q
    "${clean[@]}" docker compose --env-file "$envfile" "${args[@]}" --profile '*' config -q
  done
  echo "compose config ok: $combo"
done
