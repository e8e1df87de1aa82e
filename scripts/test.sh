#!/usr/bin/env bash
# Sets up a Debian 12 machine (as root) and runs the whole test suite: once as root, then the
# runtime suite again as an unprivileged user with cgroups delegated by `sandboxd setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
# It creates a test user and delegates cgroups to it: root's work.
[ "$(id -u)" -eq 0 ] || exec sudo bash "$0" "$@"
bash scripts/setup.sh

# The image tests meet a real registry and images made by independent tools.
source scripts/apt.sh
apt_install_missing docker-registry skopeo umoci apache2-utils openssl

test_user=sbx-test
if ! id "$test_user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$test_user"
fi
for f in /etc/subuid /etc/subgid; do
    grep -q "^$test_user:" "$f" || echo "$test_user:300000:65536" >> "$f"
done

status=0
echo "== tests as root"
.venv/bin/pytest -q -p no:cacheprovider tests || status=1

echo "== runtime suite as the unprivileged user $test_user"
.venv/bin/sandboxd setup --user "$test_user"
# The user cannot read this checkout's parent directories, so it gets a copy of its own.
copy=$(mktemp -d /var/tmp/sandboxd-test.XXXXXX)
chmod 755 "$copy"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$copy"
chown -R "$test_user:" "$copy"
shared=$(cd .. && pwd)/shared
runuser -u "$test_user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="/home/$test_user" \
    SANDBOXD_SHARED="$shared" bash -c "
        set -e; cd '$copy'
        /usr/bin/python3 -m venv .venv
        .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
        .venv/bin/pytest -q -p no:cacheprovider tests/integration tests/security tests/unit
    " || status=1
.venv/bin/sandboxd setup --user "$test_user" --remove
rm -rf "$copy"
exit $status
