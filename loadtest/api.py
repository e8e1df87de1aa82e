"""The API benchmark: `python -m loadtest.api [--requests N] [--seconds S] [--idle N]`.

It starts its own loopback registry and `sandboxd serve` (as `python -m loadtest --spawn`
does) and measures, in one run, with the bare baseline beside each figure:

- a warm run over HTTP: POST /v1/runs of busybox `true` (executed directly, no shell) on
  the judge policy (a warm, reset container), one at a time: median and p99 from the
  client's side; bare: the same busybox `true` posix_spawned locally;
- throughput: the same at concurrency 8 for `--seconds`, sandboxed and bare;
- memory: the service, its spawner and `--idle` idle warm containers (the pool filled to
  that size), as the sum of their proportional set sizes (PSS: shared pages counted once).

Figures and ratios only; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from loadtest.http.driver import closed_loop
from loadtest.http.service import spawned
from loadtest.http.stats import summary
from loadtest.http.targets import BareEnv, BareTarget, HttpTarget
from loadtest.http.workloads import WORKLOADS
from loadtest.output import emit
from sandbox import busybox

TRUE = WORKLOADS["exec"]  # busybox true, one exec, no shell
FILL_TIMEOUT_S = 120.0


async def _latency(target: HttpTarget | BareTarget, n: int) -> dict[str, Any]:
    return summary((await closed_loop(target.send, 1, requests=n)).recorder, 1.0, False)


async def _throughput(target: HttpTarget | BareTarget, seconds: float) -> float:
    phase = await closed_loop(target.send, 8, duration_s=seconds)
    return float(summary(phase.recorder, phase.elapsed_s, False)["throughput_per_s"])


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/v1/info", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def _pss_mib(pid: int) -> float:
    """The service and every process below it (spawner, containers' inits)."""
    root = psutil.Process(pid)
    total = 0
    for p in (root, *root.children(recursive=True)):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


def _wait_idle(url: str, want: int) -> int:
    deadline = time.monotonic() + FILL_TIMEOUT_S
    idle = 0
    while time.monotonic() < deadline:
        idle = sum(int(p.get("idle", 0)) for p in _info(url).get("pools", []))
        if idle >= want:
            break
        time.sleep(0.5)
    return idle


async def _first_run(url: str, image: str) -> None:
    async with HttpTarget(url, None, image, TRUE, 1, 300.0) as http:
        outcome = await http.send(0)
    if not outcome.ok:
        raise SystemExit(f"the first run failed: {outcome.error or outcome.status}")


async def _measure(url: str, image: str, requests: int, seconds: float,
                   bare_env: BareEnv) -> dict[str, Any]:
    async with HttpTarget(url, None, image, TRUE, 8, 60.0) as http, \
            BareTarget(bare_env, TRUE, 8) as bare:
        warm = await _latency(http, requests)
        bare_lat = await _latency(bare, requests)
        rate = await _throughput(http, seconds)
        bare_rate = await _throughput(bare, seconds)
    return {
        "warm_run_median_ms": warm["latency_ms"]["p50"],
        "warm_run_p99_ms": warm["latency_ms"]["p99"],
        "warm_run_errors": warm["errors"],
        "bare_exec_median_ms": bare_lat["latency_ms"]["p50"],
        "bare_exec_p99_ms": bare_lat["latency_ms"]["p99"],
        "runs_per_s": round(rate, 1),
        "bare_runs_per_s": round(bare_rate, 1),
    }


def run(requests: int, seconds: float, idle: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="sandboxd-bench-api-"))
    try:
        bare_env = BareEnv(busybox.build_rootfs(base / "rootfs"), base / "scratch")
        bare_env.scratch.mkdir()
        with spawned(max(idle, 8), min_idle=idle) as svc:
            asyncio.run(_first_run(svc.url, svc.image))  # pulls; the pool fills to `idle`
            filled = _wait_idle(svc.url, idle)
            memory = round(_pss_mib(svc.pid), 1)
            fig = asyncio.run(_measure(svc.url, svc.image, requests, seconds, bare_env))
            fig["idle_containers"] = filled
            fig[f"idle_rss_mib_{idle}"] = memory
    finally:
        shutil.rmtree(base, ignore_errors=True)
    fig["warm_vs_bare_median"] = round(fig["warm_run_median_ms"]
                                       / fig["bare_exec_median_ms"], 2)
    fig["runs_per_s_vs_bare"] = round(fig["runs_per_s"] / fig["bare_runs_per_s"], 3)
    fig["memory_measure"] = "PSS sum: service + spawner + idle containers' inits"
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.api", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500, help="sequential runs (latency)")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput phase length")
    ap.add_argument("--idle", type=int, default=100, help="idle warm containers to weigh")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.seconds, args.idle = 20, 1.0, 4
    if args.requests < 2 or args.seconds <= 0 or args.idle < 1:
        ap.error("--requests >= 2, --seconds > 0 and --idle >= 1")
    fig = run(args.requests, args.seconds, args.idle)
    emit(fig, args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
