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
  want=$(cat pyproject.toml tools/install.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  EDITABLE=1 tools/install.sh "$venv" base "$extras"
  echo "$want" > "$stamp"
}

setup_eval() {
  # The evaluator's mmdet 2.x stack (tools/install.sh says why each step is as it is); only the first
  # machine pays the mmcv-full compile, pip keeps the wheel in its cache.
  local stamp="$venv/.installed-eval" want
  want=$(cat pyproject.toml tools/cxx20 tools/install.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  tools/install.sh "$venv" eval
  echo "$want" > "$stamp"
}

setup_postgres_server() {
  # The PostgreSQL tests start a throwaway server of their own; they need its binaries (Debian's package).
  if command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "note: no PostgreSQL server binaries (apt-get install postgresql): the PostgreSQL tests will be skipped" >&2
  fi
}

case "${1:-}" in
  run)
    shift
    setup postgres
    case " $* " in  # the evaluator needs the mmdet stack; the uploader does not
      " evaluate "*|*" --evaluate "*) setup_eval ;;
    esac
    exec "$venv/bin/mmdet-wandb" "$@"
    ;;
  test)
    shift
    setup test,postgres
    setup_eval
    setup_postgres_server
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run (watch|backfill|evaluate|status|config|doctor|...) ... | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
