#!/usr/bin/env bash
# The two entry points of the README, on a fresh machine or an old one:
#   ./dev.sh run watch /data/work_dirs     set up (once) and run the service on the embedded default
#   ./dev.sh test [pytest args]            set up (once, with both mmdet stacks the tests train with) and run the tests
# Set-up is a virtual environment in .venv (MMDET_WANDB_VENV to move it), reinstalled when pyproject.toml changes;
# the mmdet 3.x evaluator stack lives in .venv-mmdet3 (MMDET_WANDB_MMDET3_VENV), since both stacks install `mmcv`.
set -euo pipefail
cd "$(dirname "$0")"
venv=${MMDET_WANDB_VENV:-.venv}
venv3=${MMDET_WANDB_MMDET3_VENV:-.venv-mmdet3}

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

compile_sources() {
  # The project's modules as bytecode, as pip leaves an installed package (the images): an editable install has
  # none, and where PYTHONDONTWRITEBYTECODE is set no import writes them, so every start of the service would
  # compile them all again (~0.2 s of its restart, benchmarks/faults.py). Only changed files are compiled.
  "$venv/bin/python" -m compileall -q common db uploader mmdet_wandb evaluator
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

setup_mmdet3() {
  # The mmdet 3.x stack (mmcv 2.1.0 compiles like mmcv-full; pip keeps both wheels in its cache) with the project
  # beside it, for 3.x eval workers; the 2.x environment runs them through MMDET_WANDB_MMDET3_PYTHON.
  local stamp="$venv3/.installed-mmdet3" want
  want=$(cat pyproject.toml tools/cxx20 tools/install.sh | sha256sum | cut -d' ' -f1)
  if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    EDITABLE=1 tools/install.sh "$venv3" base test
    tools/install.sh "$venv3" mmdet3
    echo "$want" > "$stamp"
  fi
  export MMDET_WANDB_MMDET3_PYTHON="$PWD/$venv3/bin/python"
}

setup_postgres_server() {
  # The PostgreSQL tests start a throwaway server of their own; they need its binaries (Debian's package), and
  # tests/test_db_network.py a network namespace whose packets iptables drops.
  if { command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; } \
      && command -v iptables >/dev/null && command -v ip >/dev/null; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql iptables iproute2 >/dev/null
  else
    echo "note: no PostgreSQL server binaries (apt-get install postgresql): the PostgreSQL tests will be skipped" >&2
  fi
}

setup_container_engine() {
  # tests/test_containers.py builds the images and runs the compose stack with podman (runc: crun cannot run on
  # cgroup v1 hosts; debootstrap makes the local base where no registry is reachable).
  if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
  else
    echo "note: no podman (apt-get install podman runc debootstrap): the container tests will be skipped" >&2
  fi
}

case "${1:-}" in
  run)
    shift
    setup postgres
    compile_sources
    case " $* " in  # the evaluator needs an mmdet stack; the uploader does not
      " evaluate "*"--stack mmdet3"*) setup_mmdet3; exec "$venv3/bin/mmdet-wandb" "$@" ;;
      " evaluate "*) setup_eval ;;
      " backfill "*" --evaluate "*)
        setup_eval
        shift  # backfill: its roots hold an mmdet 3.x (MMEngine) work_dir when a vis_data/scalars.json is there
        for arg in "$@"; do
          if [ -d "$arg" ] && [ -n "$(find "$arg" -path '*/vis_data/scalars.json' -print -quit 2>/dev/null)" ]; then
            setup_mmdet3
            break
          fi
        done
        set -- backfill "$@"
        ;;
    esac
    exec "$venv/bin/mmdet-wandb" "$@"
    ;;
  test)
    shift
    setup test,postgres,docs
    setup_eval
    setup_mmdet3
    setup_postgres_server
    setup_container_engine
    compile_sources
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh run (watch|backfill|evaluate|status|config|doctor|...) ... | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
