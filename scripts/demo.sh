#!/usr/bin/env bash
# Set up (Debian packages, .venv) and run the demo: the whole chain on this
# machine, a simulated record through ALSA into the listener and matcher over
# MQTT. Extra arguments go to `vinyl-mqtt demo` (--mqtt-host, --pace, --music).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/vinyl-mqtt demo "$@"
