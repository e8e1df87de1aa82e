#!/usr/bin/env bash
# Builds sandboxd's container images with sandboxd's own build: a `sandboxd serve` of its
# own (a throwaway state directory, loopback only) imports a base root made from this
# machine's Debian 12 packages and `sbx build`s deploy/Dockerfile over it, then the image of
# the pull-through cache (deploy/registry-cache/Dockerfile). No base image is pulled: this
# machine reaches no registry but the package ones (a networked one may pass
# --base python:3.11-slim-bookworm, which the build then pulls).
#
#   deploy/build-image.sh [--push REGISTRY] [--out DIR] [--base IMAGE]
#
# --push REGISTRY  push sandboxd:VERSION and sandboxd-registry-cache:VERSION to REGISTRY
#                  (host[:port][/path]; a registry this service may push to);
# otherwise        both are written as docker-archive tars to DIR (default ./sandboxd-images)
#                  for `ctr -n k8s.io images import` or `kind load image-archive`.
# Needs: the project's .venv (scripts/setup.sh), docker-registry and skopeo (Debian).
set -euo pipefail
push="" out="$PWD/sandboxd-images" base=""
while [ $# -gt 0 ]; do
    case $1 in
        --push) push=$2; shift 2 ;;
        --out) out=$(realpath -m "$2"); shift 2 ;;
        --base) base=$2; shift 2 ;;
        *) sed -n '2,16p' "$0" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
root=$PWD
py=$root/.venv/bin/python
sbx() { "$root/.venv/bin/sbx" --url "http://127.0.0.1:$port" "$@"; }
version=$("$py" -c 'from importlib.metadata import version; print(version("sandboxd"))')

work=$(mktemp -d /var/tmp/sandboxd-image.XXXXXX)
# Every temporary file of the build's tools in there, gone with it.
export TMPDIR=$work/tmp
mkdir "$TMPDIR"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that the EXIT trap runs
free_port() {
    "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() {
    local i
    for i in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "$2 did not start; its log:" >&2; cat "$3" >&2; exit 1
}

echo "== sandboxd $version and its Python packages (built from a copy of the tree)"
mkdir -p "$work/src" "$work/ctx"
git=(git -c "safe.directory=$root")   # a checkout another user owns is still read
if "${git[@]}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    "${git[@]}" ls-files -z --cached --others --exclude-standard |
        xargs -0 cp --parents -t "$work/src"
else   # a copy of the files without git (CI's run as an ordinary user)
    tar -c --exclude=./.venv --exclude=./build --exclude=./bench-results --exclude='*.so' \
        --exclude=__pycache__ --exclude=./sandbox/runtime/sbx-init . | tar -x -C "$work/src"
fi
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$work/src"
"$py" -m pip install -q --no-compile --target "$work/ctx/site" "$work/wheels"/sandboxd-*.whl
rm -rf "$work/ctx/site/bin"   # console scripts naming this machine's interpreter

if [ -z "$base" ]; then
    echo "== base roots from this machine's Debian packages"
    "$py" deploy/baseimage.py sandboxd "$work/ctx/site" "$work/sandboxd-base.tar.gz"
fi
"$py" deploy/baseimage.py registry-cache "$work/registry-base.tar.gz"

echo "== a sandboxd of the build's own, and a registry to take the images"
port=$(free_port) regport=$(free_port)
mkdir -m 0700 "$work/state"
"$root/.venv/bin/sandboxd" serve --port "$port" --state-dir "$work/state" \
    > "$work/serve.log" 2>&1 &
pids+=($!)
local_registry=127.0.0.1:$regport
cat > "$work/registry.yml" <<EOF
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: "127.0.0.1:$regport"}
EOF
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$port/readyz" "sandboxd serve" "$work/serve.log"
wait_for "http://$local_registry/v2/" "docker-registry" "$work/registry.log"

if [ -z "$base" ]; then
    sbx import "$work/sandboxd-base.tar.gz" "sandboxd-base:$version" >/dev/null
    base=sandboxd-base:$version
fi
sbx import "$work/registry-base.tar.gz" "sandboxd-registry-cache-base:$version" >/dev/null

dest=${push:-$local_registry}
echo "== sbx build: $dest/sandboxd:$version"
sbx build -t "$dest/sandboxd:$version" --build-arg "BASE=$base" -f deploy/Dockerfile "$work/ctx"
echo "== sbx build: $dest/sandboxd-registry-cache:$version"
mkdir "$work/ctx-registry"
sbx build -t "$dest/sandboxd-registry-cache:$version" \
    --build-arg "BASE=sandboxd-registry-cache-base:$version" \
    -f deploy/registry-cache/Dockerfile "$work/ctx-registry"
for name in sandboxd sandboxd-registry-cache; do
    sbx push "$dest/$name:$version" >/dev/null
done

if [ -z "$push" ]; then
    mkdir -p "$out"
    for name in sandboxd sandboxd-registry-cache; do
        rm -f "$out/$name-$version.tar"
        skopeo copy -q --src-tls-verify=false "docker://$dest/$name:$version" \
            "docker-archive:$out/$name-$version.tar:$name:$version"
        echo "$out/$name-$version.tar ($name:$version)"
    done
else
    echo "pushed $dest/sandboxd:$version and $dest/sandboxd-registry-cache:$version"
fi
