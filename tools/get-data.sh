#!/usr/bin/env bash
# Fetch a real dataset for vitablate (vitablate itself never downloads anything).
#
#   tools/get-data.sh fashion-mnist [DATA_ROOT]
#
# fashion-mnist: where apt exists, installs Debian/Ubuntu's package dataset-fashion-mnist (the four
# gzipped IDX files in /usr/share/datasets/fashion-mnist/, where vitablate looks for them);
# otherwise downloads them with torchvision into DATA_ROOT/FashionMNIST/raw/ (default DATA_ROOT:
# data, the config's data_root).
set -euo pipefail

usage() { echo "usage: $0 fashion-mnist [DATA_ROOT]" >&2; exit 2; }
[ $# -ge 1 ] || usage
name=$1
root=${2:-data}

case "$name" in
  fashion-mnist)
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
      fi
      ls -l /usr/share/datasets/fashion-mnist/
      echo "fashion-mnist: /usr/share/datasets/fashion-mnist (found by vitablate without any config)"
    else
      python3 - "$root" <<'PY'
import sys
from torchvision.datasets import FashionMNIST

for train in (True, False):
    FashionMNIST(sys.argv[1], train=train, download=True)
print(f"fashion-mnist: {sys.argv[1]}/FashionMNIST/raw (set data_root: {sys.argv[1]})")
PY
    fi
    ;;
  *) echo "unknown dataset '$name'; known: fashion-mnist" >&2; usage ;;
esac
