#!/usr/bin/env bash
# The one place that installs mmdet-wandb into a virtual environment; dev.sh (README, CI) and the Dockerfiles
# all call it, so the images are built by the same steps that CI runs.
#   tools/install.sh VENV base [EXTRAS]   the project (editable with EDITABLE=1), with the given extras
#   tools/install.sh VENV eval            the evaluator's mmdet 2.x stack, in the order it needs
#   tools/install.sh VENV mmdet3          the evaluator's mmdet 3.x stack (its own venv: both stacks install `mmcv`)
# eval: mmcv-full 1.7.2 has no wheel for this torch and compiles against the installed torch (no build
# isolation, setuptools<70, C++20 for torch's headers: tools/cxx20). Set FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST
# to build its CUDA ops (the evaluator image does). pip keeps the built wheel in its cache.
# mmdet3: mmdet 3.3 needs mmcv < 2.2; mmcv 2.1.0 has no wheel either and compiles the same way (MMCV_WITH_OPS=1).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$1 what=$2 extras=${3:-}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
case "$what" in
  base)
    "${pip[@]}" --upgrade pip
    target="$here${extras:+[$extras]}"
    if [ "${EDITABLE:-0}" = 1 ]; then "${pip[@]}" -e "$target"; else "${pip[@]}" "$target"; fi
    ;;
  eval)
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    "${pip[@]}" "setuptools<70" wheel "numpy<1.24"
    CXX="$here/tools/cxx20" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${pip[@]}" --no-build-isolation mmcv-full==1.7.2 "opencv-python>=4.5,<4.9" "numpy<1.24"
    "${pip[@]}" mmdet==2.28.2 "pycocotools>=2.0.7" "opencv-python>=4.5,<4.9" "numpy<1.24"
    ;;
  mmdet3)
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    "${pip[@]}" "setuptools<70" wheel "numpy<2"
    CXX="$here/tools/cxx20" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${pip[@]}" --no-build-isolation mmcv==2.1.0 "opencv-python>=4.5,<4.11" "numpy<2"
    "${pip[@]}" mmengine==0.10.7 mmdet==3.3.0 "pycocotools>=2.0.7" "opencv-python>=4.5,<4.11" "numpy<2"
    ;;
  *)
    echo "usage: tools/install.sh VENV base [EXTRAS] | tools/install.sh VENV eval | tools/install.sh VENV mmdet3" >&2
    exit 2
    ;;
esac
