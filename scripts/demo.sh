#!/usr/bin/env bash
# demo.sh runs the end-to-end demo: a real Telegraf v1.37.2 with both
# OmniCore plugins against the bridge emulator, on loopback, for
# ${DEMO_DURATION:-25s}. It builds what it needs (the custom Telegraf is
# cached in ${BUILD_DIR:-$HOME/.cache/telegraf-omnicore}) and keeps everything
# else in a temporary directory. See e2e/demo/main.go.
#
#   scripts/demo.sh              # or: make demo
#   DEMO_DURATION=60s scripts/demo.sh
#   scripts/demo.sh -keep        # keep the configs, keys and logs
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${GO:-go}" run ./e2e/demo "$@"
