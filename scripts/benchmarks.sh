#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, measured in one go on this machine (Debian 12, as
# root): the runtime, the seccomp filter's load, pulls, the API and its per-layer profile, commits (loadtest.build),
# the HTTP load test with its peers (bwrap, crun, runc, podman) and the isolation sweep, the
# open loop, the CPU-share check and the verdict soak. Every goal of issue #11 for both the
# judge and the default policy: warm runs over HTTP and without, idle memory, cold starts,
# and a writable run's root against a fresh container's (runtime.txt, api.txt). Beside each figure, its bare
# baseline from the same run: the tight fork+exec and posix_spawn loops of
# loadtest/baseline.py, and the ratio. The outputs (tables, JSON lines, py-spy's raw
# stacks per policy, the HTML reports) go to OUT (default bench-results/<time>). Takes
# 45-55 minutes on 2 cores (the soak ~20); run it with nothing else on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || exec sudo bash "$0" "$@"
bash scripts/setup.sh
source scripts/lib.sh
# The pull benchmark compares with skopeo and umoci, the build benchmark with buildah; the
# load test runs through its peers.
apt_install_missing docker-registry skopeo umoci bubblewrap crun runc podman buildah haproxy
py=.venv/bin/python
# The API's profile samples the service with py-spy (not a dependency of sandboxd).
[ -x .venv/bin/py-spy ] || $py -m pip install -q py-spy

out=${OUT:-bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
step=""
trap '[ -n "$step" ] && kill -TERM -- "-$step" 2>/dev/null; exit 130' INT TERM
run() {  # NAME COMMAND...: its table and JSON line to OUT/NAME.txt, shown when it ends
    local name=$1 status=0
    shift
    echo "== $name: $*"
    # A session of its own: the bare sides' processes are then one scheduling group, as
    # the service's runs are in its cpu cgroup, whatever else runs in this shell's session.
    setsid "$@" >"$out/$name.txt" 2>"$out/$name.log" &
    step=$!
    wait "$step" || status=$?
    step=""
    cat "$out/$name.txt"
    return "$status"
}

policies=judge,default
run runtime $py -m loadtest.runtime --policy $policies
run filterload $py -m loadtest.filterload
run pull $py -m loadtest.pull
# py-spy's stacks per policy: api-profile.judge.raw, api-profile.default.raw.
run api $py -m loadtest.api --policy $policies --profile --profile-out "$out/api-profile.raw"
# Images made here (issue #12): a commit beside tar|gzip of the same files.
run build $py -m loadtest.build
run http $py -m loadtest --spawn --workload all --concurrency 4 --requests 200 \
    --peers auto --sweep 300 --html "$out/report.html" --json-out "$out/http.json"
run open-loop $py -m loadtest --spawn --workload exec,judge --rate 250 --duration 20 \
    --peers none --html "$out/open-loop.html" --json-out "$out/open-loop.json"
# Why `cpu` once came out faster sandboxed than bare: two CPU hogs in the load generator's
# own session share its scheduling group with the client's bare runs, not with the
# service's cgroup; the tight loops run in a session of their own, and stay fair.
run cpu-shared-session bash -c '
    for i in 1 2; do busybox sh -c "while :; do :; done" & done
    trap "kill %1 %2" EXIT
    '"$py"' -m loadtest --spawn --workload cpu --concurrency 4 --requests 60 --peers none \
        --json-out '"$out"'/cpu-shared-session.json'
# Judge workflows (issue #13): a submission (compile once, its cases as a batch), a batch of
# 1,000 cases from a cached binary, an interactor and its solution, 50 repeats of a 1 s loop;
# then the verdicts of 64 CPU-bound runs at once, without and with CPU slots.
run judge $py -m loadtest.judge
run timing $py -m loadtest.timing
# Many nodes (issue #14): two nodes, each on one CPU, behind HAProxy against one; the
# balancer's cost on a warm run (direct against through HAProxy).
run cluster $py -m loadtest.cluster
# The soak (issue #14): 100,000 requests at 32 whose answers are known in advance, then
# nothing lost, wrong or leaked, and p99 held (docs/reliability.md); ~20 min.
run soak $py -m loadtest.soak --spawn
echo "== done: $out"
