#!/usr/bin/env bash
# Set everything up, then run the demo: patch a small built-in model and print
# speed and accuracy before and after (no network needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source .venv/bin/activate
cd /tmp && python -m pyaccel.demo "$@"
