#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 / Python 3.11 machine: installs what the tests need (the Debian
# prometheus and prometheus-alertmanager packages, a virtualenv with gradtel[tensorflow,dev]), runs ruff and
# pytest. Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
    || ! command -v prometheus-alertmanager >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[tensorflow,dev]'
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
