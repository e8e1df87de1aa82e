# Sourced by setup.sh, demo.sh and test.sh.

# Install the Debian packages given that are missing.
apt_install_missing() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# As root: make USER able to run sandboxd rootless (subordinate ids, delegated cgroups).
prepare_user() {
    local user=$1 start=$2 f
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    for f in /etc/subuid /etc/subgid; do
        grep -q "^$user:" "$f" || echo "$user:$start:65536" >> "$f"
    done
    .venv/bin/sandboxd setup --user "$user" >/dev/null
}

# As root: run a shell command as USER in this checkout, or, when USER cannot read it (a
# checkout under /root) or a third argument says "copy", in a copy of its git-tracked
# files with a venv of its own.
run_as_user() {
    local user=$1 cmd=$2 mode=${3:-} copy status=0
    if [ "$mode" != copy ] &&
        runuser -u "$user" -- test -x "$PWD/.venv/bin/python" -a -r "$PWD/pyproject.toml"; then
        runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
            HOME="$(getent passwd "$user" | cut -d: -f6)" bash -c "cd '$PWD' && $cmd" || status=$?
        return $status
    fi
    copy=$(mktemp -d /var/tmp/sandboxd-copy.XXXXXX)
    chmod 755 "$copy"
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$copy"
    chown -R "$user:" "$copy"
    runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
        HOME="$(getent passwd "$user" | cut -d: -f6)" SANDBOXD_SHARED="${SANDBOXD_SHARED:-}" \
        bash -c "set -e; cd '$copy'
                 /usr/bin/python3 -m venv .venv
                 .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
                 $cmd" || status=$?
    rm -rf "$copy"
    return $status
}
