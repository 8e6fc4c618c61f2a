#!/usr/bin/env bash
# Make sure the raw Fashion-MNIST IDX files are on this machine (Debian package
# dataset-fashion-mnist); without root or apt, `rela-pipeline prepare` falls back to torchvision's
# download and otherwise says how to get the files.
set -euo pipefail
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
