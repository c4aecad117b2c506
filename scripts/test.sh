#!/usr/bin/env bash
# Set up and run the test suite on a fresh Debian / Raspberry Pi OS machine:
# installs the Debian packages the tests use, a virtualenv with the project and
# its test extras, then runs pytest (extra arguments are passed to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: ffmpeg makes the test media (mp3, flac, m4a, ogg, opus, wav).
pkgs=(ffmpeg)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project and its Python dependencies, in .venv.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

exec .venv/bin/python -m pytest "$@"
