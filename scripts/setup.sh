#!/usr/bin/env bash
# Installs what sandboxd needs on Debian 12 (run as root) and builds the venv at .venv.
# Safe to run again: every step checks before it changes anything.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh installs system packages: run it as root (sudo bash scripts/setup.sh)" >&2
    exit 1
fi

source scripts/lib.sh
apt_install_missing busybox-static gcc libc6-dev python3-dev uidmap libseccomp2 python3 \
    python3-venv procps

# Container root must never be host root: root's containers map into a subordinate range.
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -q '^root:' "$f" || echo "root:100000:65536" >> "$f"
done

# Debian's interpreter, not a per-user build (pyenv under /root cannot be run by others).
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

# Host tuning for many short-lived cgroup moves (see docs/architecture.md).
.venv/bin/sandboxd setup
