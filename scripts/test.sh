#!/usr/bin/env bash
# Sets up a Debian 12 machine (as root) and runs the whole test suite: as root, then again
# as an unprivileged user with cgroups delegated by `sandboxd setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
# It creates a test user and delegates cgroups to it: root's work.
[ "$(id -u)" -eq 0 ] || exec sudo bash "$0" "$@"
bash scripts/setup.sh

# The image tests meet a real registry and images made by independent tools (builds are
# compared with buildah's); the load test runs its workloads through the peers too; tmux
# is the real terminal that drives `sbx run -it`; the README's examples use curl and jq.
source scripts/lib.sh
apt_install_missing docker-registry skopeo umoci apache2-utils openssl bubblewrap crun runc buildah haproxy iproute2 passt slirp4netns systemd dbus libpam-systemd tmux curl jq

# Rootless `network = "full"` (slirp4netns) opens /dev/net/tun: Debian's udev rules make it
# 0666, a machine without udev leaves it 0600 (root's only).
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun

test_user=sbx-test
prepare_user "$test_user" 300000

# Each pass has a temporary directory of its own: the suite's check that nothing was left
# behind reads it, so another user of /tmp on the machine (a benchmark, another checkout's
# tests) cannot fail it, and nothing the suite leaves is hidden among theirs.
tmp_root=$(mktemp -d /tmp/suite-root.XXXXXX)
tmp_user=$(mktemp -d /tmp/suite-user.XXXXXX)
chown "$test_user:" "$tmp_user"
# Open to others as /tmp is: tests start services as other users on files made below it.
chmod 0755 "$tmp_root" "$tmp_user"
trap 'rm -rf "$tmp_root" "$tmp_user"' EXIT

status=0
echo "== tests as root"
# Tests marked one_pass (a tool's output, the schema, the README's examples) do not depend
# on who runs the service: they run once, in the unprivileged pass, the product's own.
TMPDIR=$tmp_root .venv/bin/pytest -q -p no:cacheprovider --durations=15 -m "not one_pass" \
    tests || status=1

echo "== the suite again as the unprivileged user $test_user (cgroups delegated to it)"
# Its own copy of the tree: nothing the root run left (caches, venv) can help or hide.
SANDBOXD_SHARED=$(cd .. && pwd)/shared run_as_user "$test_user" \
    "TMPDIR=$tmp_user .venv/bin/pytest -q -p no:cacheprovider --durations=15 tests" copy \
    || status=1
.venv/bin/sandboxd setup --user "$test_user" --remove >/dev/null
exit $status
