#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, measured in one go on this machine (Debian 12, as
# root): the runtime, pulls, the API, and the HTTP load test with its peers (bwrap, crun,
# runc, podman), the isolation sweep and the verdict soak. Each benchmark measures its own
# baseline in the same run; the outputs (tables, JSON lines, the HTML report) go to
# OUT (default bench-results/<time>). Takes 15-25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || exec sudo bash "$0" "$@"
bash scripts/setup.sh
source scripts/lib.sh
# The pull benchmark compares with skopeo and umoci; the load test runs through its peers.
apt_install_missing docker-registry skopeo umoci bubblewrap crun runc podman

out=${OUT:-bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
py=.venv/bin/python
run() {  # NAME COMMAND...: its table and JSON line to OUT/NAME.txt, shown as it goes
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>"$out/$name.log" | tee "$out/$name.txt"
}

run runtime $py -m loadtest.runtime
run pull $py -m loadtest.pull
run api $py -m loadtest.api
run http $py -m loadtest --spawn --workload all --concurrency 4 --requests 200 \
    --peers auto --sweep 300 --html "$out/report.html" --json-out "$out/http.json"
run open-loop $py -m loadtest --spawn --workload exec,judge --rate 250 --duration 20 \
    --peers none --html "$out/open-loop.html" --json-out "$out/open-loop.json"
# 20,000 runs whose verdicts are known in advance: any wrong one is a failure.
run soak $py -m loadtest.soak --spawn --runs 20000 --concurrency 16
echo "== done: $out"
