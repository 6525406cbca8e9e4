#!/usr/bin/env bash
# Build the four service images from the repository root and print each one's size and build
# time. Podman by default (daemonless; see deploy/podman-setup.sh for a fresh machine);
# ENGINE=docker works where a Docker engine and Docker Hub are available.
#
#   deploy/build-images.sh                      # all four, tag :latest
#   TAG=2026-11-21 deploy/build-images.sh ingest bars
#   BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm ENGINE=docker deploy/build-images.sh
#
# Environment: ENGINE (podman), TAG (latest), PREFIX (localhost/tickmesh-),
# BASE_IMAGE (localhost/tickmesh-python:bookworm), SETUP=1 to run podman-setup.sh first,
# REV=<git revision> to build a commit instead of the working tree.
#
# All images are built from one snapshot of the sources (the working tree's tracked and
# untracked, not ignored files, or `git archive $REV`), so the four match each other even while
# files change, and the shared build stage is cached after the first image.
set -euo pipefail

cd "$(dirname "$0")/.."
ENGINE="${ENGINE:-podman}"
TAG="${TAG:-latest}"
PREFIX="${PREFIX:-localhost/tickmesh-}"
BASE_IMAGE="${BASE_IMAGE:-localhost/tickmesh-python:bookworm}"
SERVICES=("$@")
[ "${#SERVICES[@]}" -gt 0 ] || SERVICES=(ingest bars engine_bridge mirror dashboard)

if [ -n "${SETUP:-}" ]; then
    BASE_IMAGE="$BASE_IMAGE" deploy/podman-setup.sh
fi

format=()
# Podman writes OCI images by default, and OCI has no HEALTHCHECK: ask for Docker's format.
[ "$ENGINE" = podman ] && format=(--format docker)

context=.
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if git rev-parse --git-dir >/dev/null 2>&1; then
    context="$(mktemp -d "${TMPDIR:-/tmp}/tickmesh-build.XXXXXX")"
    trap 'rm -rf "$context"' EXIT
    if [ -n "${REV:-}" ]; then
        revision="$(git rev-parse "$REV")"
        git archive "$revision" | tar -x -C "$context"
    else
        git diff --quiet HEAD 2>/dev/null || revision="${revision}-dirty"
        git ls-files -z --cached --others --exclude-standard \
            | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -x -C "$context"
    fi
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

total_started=$(now)
for service in "${SERVICES[@]}"; do
    dockerfile="$context/deploy/docker/${service}.Dockerfile"
    [ -f "$dockerfile" ] || { echo "build-images: no deploy/docker/${service}.Dockerfile" >&2; exit 2; }
    image="${PREFIX}${service}:${TAG}"
    started=$(now)
    # Never --pull: the base is a local image that no registry has.
    "$ENGINE" build "${format[@]}" --quiet --build-arg "BASE_IMAGE=${BASE_IMAGE}" \
        --label "org.opencontainers.image.revision=${revision}" \
        --label "org.opencontainers.image.title=tickmesh-${service}" \
        -f "$dockerfile" -t "$image" "$context" >/dev/null
    elapsed=$(since "$started")
    size=$("$ENGINE" image inspect --format '{{.Size}}' "$image")
    printf '%-40s %7s MB  built in %5s s\n' "$image" \
        "$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')" "$elapsed"
done
echo "total $(since "$total_started") s"
