#!/usr/bin/env bash
# Shared by demo.sh and test.sh: the Debian packages vinyl-mqtt needs, and a
# virtualenv (.venv) with the project installed. Usage: scripts/setup.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."

# libasound2-dev: pyalsaaudio builds against it; mosquitto: the demo's broker
# and the tests' (each test starts its own on a free port); alsa-utils: ALSA's
# configuration and `arecord -l`; ffmpeg: the tests make mp3/flac/m4a/opus media.
pkgs=(libasound2-dev alsa-utils mosquitto ffmpeg)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extras="${1:-}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
