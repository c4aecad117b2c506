#!/usr/bin/env bash
# Set up (as scripts/test.sh does, without the test extras) and run the demo:
# a library from the bundled recordings, clips played through a simulated
# turntable, and what vinyl-mqtt recognises in them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/vinyl-mqtt demo "$@"
