#!/usr/bin/env bash
# The two entry points of the README, on a fresh machine or an old one:
#   ./dev.sh run watch /data/work_dirs     set up (once) and run the service on the embedded default
#   ./dev.sh test [pytest args]            set up (once, with the mmdet stack the tests train with) and run the tests
# Set-up is a virtual environment in .venv (MMDET_WANDB_VENV to move it), reinstalled when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"
venv=${MMDET_WANDB_VENV:-.venv}

setup() {
  local extras=$1 stamp="$venv/.installed-$1"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
}

setup_eval() {
  # The evaluator's mmdet 2.x stack, in the order it needs: mmcv-full compiles against the installed torch
  # (no build isolation, setuptools<70, C++20 for torch's headers: tools/cxx20); pip keeps the built wheel
  # in its cache, so only the first machine pays the ~15 minutes.
  local stamp="$venv/.installed-eval" want
  want=$(cat pyproject.toml tools/cxx20 | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  local pip=("$venv/bin/python" -m pip install --quiet)
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  "${pip[@]}" "setuptools<70" wheel "numpy<1.24"
  CXX="$PWD/tools/cxx20" MAX_JOBS="$(nproc)" "${pip[@]}" --no-build-isolation mmcv-full==1.7.2 "opencv-python>=4.5,<4.9" "numpy<1.24"
  "${pip[@]}" mmdet==2.28.2 "pycocotools>=2.0.7" "opencv-python>=4.5,<4.9" "numpy<1.24"
  echo "$want" > "$stamp"
}

case "${1:-}" in
  run)
    shift
    setup postgres
    exec "$venv/bin/mmdet-wandb" "$@"
    ;;
  test)
    shift
    setup test,postgres
    setup_eval
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run (watch|backfill|status) ... | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
