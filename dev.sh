#!/usr/bin/env bash
# The two entry points of the README, on a fresh machine or an old one:
#   ./dev.sh run watch /data/work_dirs     set up (once) and run the service on the embedded default
#   ./dev.sh test [pytest args]            set up (once) and run the test suite
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

case "${1:-}" in
  run)
    shift
    setup postgres
    exec "$venv/bin/mmdet-wandb" "$@"
    ;;
  test)
    shift
    setup test,postgres
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run (watch|backfill|status) ... | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
