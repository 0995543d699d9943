#!/usr/bin/env bash
# Builds the images with podman (or docker: ENGINE=docker) where no image registry is reachable, or behind a
# proxy CA or a package mirror (docs/deployment.md "Building the images").
#   tools/images.sh base                  a local Debian bookworm base from Debian's packages (debootstrap)
#   tools/images.sh build TARGET...       uploader | evaluator | evaluator-mmdet3 | evaluator-cpu |
#                                         evaluator-mmdet3-cpu | postgres
# Options (environment):
#   BASE=IMAGE       the base of every image built (default: the public image each Dockerfile names, for
#                    the CPU evaluators python:3.11-slim-bookworm, for postgres debian:bookworm-slim;
#                    `BASE=local` is the Debian base `tools/images.sh base` made).
#   BUILD_PIP_CONF=FILE  the pip configuration the builds use (mounted as /etc/pip.conf), and every absolute path
#                    it names (CA bundle, find-links, constraints; a file:// index with the folder above it, where
#                    its links point) mounted read-only at that path; `BUILD_PIP_CONF=host` takes this machine's
#                    own (`pip config list`: its files and PIP_* variables, merged). (Not PIP_*: pip reads those.)
#   BUILD_PIP_CACHE=DIR  pip's cache the builds share (default ~/.cache/pip): a wheel compiled once (mmcv) is reused.
#   BUILD_FLAGS="..."    more flags for the engine's build (e.g. --no-cache).
# Builds use the host's network (`--network host`: a proxy on localhost, the mirror's name resolution).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
engine=${ENGINE:-podman}
local_base=mmdet-wandb-debian:bookworm
targets="uploader | evaluator | evaluator-mmdet3 | evaluator-cpu | evaluator-mmdet3-cpu | postgres"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml")

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
die() { echo "tools/images.sh: $*" >&2; exit 1; }

make_base() {
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  local rootfs=$scratch/rootfs
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$engine" import - "$local_base" >/dev/null
  echo "$local_base"
}

# The absolute paths a pip configuration names (cert, find-links, constraints, file:// indexes and the folder
# above each, where an index's links point), that exist here.
pip_paths() {
  sed -n 's/^[^=]*=[[:space:]]*//p' "$1" | tr ' ' '\n' | while read -r p; do
    case "$p" in file:///*) p=$(dirname "${p#file://}") ;; esac
    case "$p" in /*) [ -e "$p" ] && echo "$p" ;; esac
  done | sort -u
}

# This machine's pip configuration, merged (`pip config list`: files and PIP_* variables) into one file.
host_pip_conf() {
  local out=$1
  echo "[global]" >"$out"
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.\([^=]*\)='\(.*\)'$/\1 = \2/p" | sort -u -t= -k1,1 >>"$out"
}

build() {
  local target=$1 dockerfile image base=${BASE:-}
  local args=(--network host --layers)
  [ "$engine" = podman ] && args+=(--format docker)  # keeps HEALTHCHECK (OCI images have none)
  case "$target" in
    uploader) dockerfile=docker/Dockerfile.uploader image=mmdet-wandb-uploader ;;
    evaluator) dockerfile=docker/Dockerfile.evaluator image=mmdet-wandb-evaluator ;;
    evaluator-mmdet3) dockerfile=docker/Dockerfile.evaluator image=mmdet-wandb-evaluator-mmdet3
      args+=(--build-arg STACK=mmdet3) ;;
    evaluator-cpu) dockerfile=docker/Dockerfile.evaluator image=mmdet-wandb-evaluator-cpu
      base=${BASE:-python:3.11-slim-bookworm}
      args+=(--build-arg FORCE_CUDA=0) ;;
    evaluator-mmdet3-cpu) dockerfile=docker/Dockerfile.evaluator image=mmdet-wandb-evaluator-mmdet3-cpu
      base=${BASE:-python:3.11-slim-bookworm}
      args+=(--build-arg STACK=mmdet3 --build-arg FORCE_CUDA=0) ;;
    postgres) dockerfile=docker/Dockerfile.postgres image=mmdet-wandb-postgres ;;  # Debian's postgresql (apt, no pip)
    *) die "unknown target '$target' ($targets)" ;;
  esac
  if [ "$base" = local ]; then
    "$engine" image exists "$local_base" 2>/dev/null || die "no $local_base image: run 'tools/images.sh base' first"
    base=$local_base
  fi
  [ -n "$base" ] && args+=(--build-arg "BASE=$base")
  local cache=${BUILD_PIP_CACHE:-$HOME/.cache/pip}
  mkdir -p "$cache"
  args+=(-v "$cache:/root/.cache/pip")
  if [ -n "${BUILD_PIP_CONF:-}" ]; then
    local conf=$BUILD_PIP_CONF
    if [ "$conf" = host ]; then
      conf=$scratch/pip.conf
      host_pip_conf "$conf"
    fi
    [ -f "$conf" ] || die "BUILD_PIP_CONF=$BUILD_PIP_CONF: no such file"
    args+=(-v "$conf:/etc/pip.conf:ro")
    while read -r path; do args+=(-v "$path:$path:ro"); done < <(pip_paths "$conf")
  fi
  # shellcheck disable=SC2086  # BUILD_FLAGS: words
  "$engine" build "${args[@]}" ${BUILD_FLAGS:-} -f "$here/$dockerfile" -t "$image:$version" "$here"
}

case "${1:-}" in
  base) make_base ;;
  build) shift; [ $# -gt 0 ] || die "build what? ($targets)"
    for target in "$@"; do build "$target"; done ;;
  *) die "usage: tools/images.sh base | tools/images.sh build TARGET..." ;;
esac
