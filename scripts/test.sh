#!/usr/bin/env bash
# Set up (Debian packages, .venv with the test extras) and run the test suite;
# extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
