#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 / Python 3.11 machine: installs what the tests need (the Debian
# prometheus and prometheus-alertmanager packages, a virtualenv with gradtel[tensorflow,dev]), runs ruff (lint and
# format check), mypy, pytest on the latest versions, then the suite's fast part on the declared minimum versions (`nox -s minimum`, on the
# oldest Python here). Extra arguments go to pytest and skip the minimum-versions run (e.g. scripts/test.sh -m
# "not slow" for the quick loop).
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
.venv/bin/ruff format --check .
.venv/bin/mypy  # gradtel/, as configured in pyproject.toml's [tool.mypy]
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider
# Python 3.10 is the declared floor: the first python3.10 that runs (a pyenv shim may exist without a working
# interpreter behind it; pyenv's own 3.10 builds are tried too); Debian 12 has only 3.11, which then runs instead.
minimum_python="$(command -v python3)"
for candidate in "$(command -v python3.10 || true)" "$HOME"/.pyenv/versions/3.10*/bin/python3.10; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import ssl, venv' 2>/dev/null; then
    minimum_python="$candidate"
    break
  fi
done
echo "minimum versions on $("$minimum_python" --version 2>&1) ($minimum_python)"
exec .venv/bin/nox -s minimum --force-python "$minimum_python"
