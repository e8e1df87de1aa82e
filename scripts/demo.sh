#!/usr/bin/env bash
# The main job, for a newcomer: set the machine up (as root, through sudo when run as an
# ordinary user), then run untrusted programs in busybox containers as the calling user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh
else
    sudo bash scripts/setup.sh
fi
exec .venv/bin/sandboxd demo
