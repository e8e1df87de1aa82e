#!/usr/bin/env bash
# The main job, for a newcomer on Debian 12: set the machine up, then, as an ordinary user
# (you, when run through sudo; else a user `sandboxd-demo`), push demo images to a local
# registry, start `sandboxd serve`, and run untrusted programs through its REST API.
set -euo pipefail
cd "$(dirname "$0")/.."
# Packages, subordinate ids and cgroup delegation are root's work.
[ "$(id -u)" -eq 0 ] || exec sudo bash "$0" "$@"
bash scripts/setup.sh
source scripts/lib.sh
apt_install_missing docker-registry

user=${SUDO_USER:-}
[ -n "$user" ] && [ "$user" != root ] || user=sandboxd-demo
prepare_user "$user" 400000
run_as_user "$user" ".venv/bin/python -m testbed.demo"
