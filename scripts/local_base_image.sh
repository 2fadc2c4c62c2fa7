#!/usr/bin/env bash
# Make a Debian base image with Python for deploy/Dockerfile, for machines that reach no container
# registry: debootstrap --variant=minbase from the machine's Debian mirror, then podman import.
#
#   image="$(scripts/local_base_image.sh)"     # prints the image's name; builds it only if missing
#   podman build --build-arg PYTHON_IMAGE="$image" -f deploy/Dockerfile .
#
# The name says what the image holds (localhost/vllm-gateway-base:bookworm-<hash of the suite and
# packages>), so it is built once and reused until that changes; `--force` rebuilds it. Progress
# goes to stderr, the image's name alone to stdout. Needs root, debootstrap and podman; about a
# minute. Environment: DEBIAN_MIRROR (default: the first Debian URI of apt's sources).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm  # Debian 12, whose python3 is 3.11 like python:3.11-slim
PACKAGES=python3-venv,ca-certificates

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "local_base_image.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

say() { printf '[base-image] %s\n' "$*" >&2; }

key="$(printf '%s\n' "$SUITE" minbase "$PACKAGES" | sha256sum | cut -c1-12)"
image="localhost/vllm-gateway-base:$SUITE-$key"
if [[ $force == 0 ]] && podman image exists "$image"; then
    say "$image is there (built earlier)"
    echo "$image"
    exit 0
fi

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -hs -E '^(URIs:|deb) ' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        | grep -v security \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$ROOT/test-artifacts/base-image.log"
mkdir -p "$(dirname "$log")"
say "building $image: debootstrap $SUITE (minbase + $PACKAGES) from $mirror; log: ${log#"$ROOT"/}"
python3 "$ROOT/scripts/run_with_progress.py" --label base-image --log "$log" --watch "$work/rootfs" -- \
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/rootfs" "$mirror" >&2
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
say "importing it into podman"
tar -C "$work/rootfs" -c . | podman import --quiet - "$image" >/dev/null
echo "$image"
