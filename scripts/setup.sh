#!/usr/bin/env bash
# Create .venv with rela-pipeline and its test and docs dependencies. Idempotent: re-runs only install
# when setup.cfg or this script changed.
#
# torch comes from the package registry (its CUDA build, which also runs on CPU): the registry has
# no CPU build of torchvision, and a local CPU-only torch wheel (pip's find-links here) does not
# import with it. --isolated makes pip ignore such local configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RELA_VENV:-.venv}"
TORCH_SPEC="${RELA_TORCH_SPEC:-torch==2.13.0}"
stamp="$VENV/.rela-installed-$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
echo "setup: installing $TORCH_SPEC, torchvision and rela-pipeline[test,docs] into $VENV (first run: a few minutes)" >&2
"$VENV/bin/python" -m pip install --isolated -q --disable-pip-version-check "$TORCH_SPEC" torchvision
"$VENV/bin/python" -m pip install --isolated -q --disable-pip-version-check -e ".[test,docs]"
rm -f "$VENV"/.rela-installed-*
touch "$stamp"
