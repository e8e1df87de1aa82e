"""The API benchmark: `python -m loadtest.api [--policy judge,default] [--requests N]
[--seconds S] [--idle N] [--profile]`.

For each policy (`--policy`, both by default) it starts its own loopback registry and
`sandboxd serve` (as `python -m loadtest --spawn` does) and measures, with the bare
baselines beside each figure:

- a warm run over HTTP: POST /v1/runs of busybox `true` (executed directly, no shell)
  with that policy (a warm container, reset after each run), one at a time: median and
  p99 from the client's side, from a lean blocking client (loadtest/http/lean.py, ~0.03
  ms of CPU a request), and again from aiohttp's client (~0.37 ms a request, which on 2
  cores lies on each request's path: `aiohttp` rows);
- the same one at a time for exit0 (loadtest/native/exit0.c: exit(0) with no libc, so no
  C library's start-up: glibc's probes of the CPU are most of `true`'s time on a VM that
  traps them), beside the bare loops of exit0; and for each program the warm median less
  the bare one: the sandbox's own time per run, whatever the program's start costs on
  this machine;
- throughput: the same as `true`'s at concurrency 8 for `--seconds`, from this Python client, and
  again from ApacheBench (`ab -k`, Debian's apache2-utils) when it is installed: the
  Python client's own CPU (~0.3 ms a request) shares the two cores with the service, so
  its figure is partly the client's; ab's C loop costs a fraction of that. Every answer
  ab counts must be a 200 and a run the service counted `ok`;
- the bare baselines of both (loadtest.baseline): the tight fork+exec and posix_spawn
  loops of the same busybox `true`, 1 and 8 at once, while the service sits idle; the
  ratios are to the fastest of them. Beside them, `client_bare_*`: the same `true`
  posix_spawned by this client's own loop (a worker thread per run, pipes for its output,
  the event loop's hand-off), the baseline of earlier rounds: it is slower than the tight
  loops by what that client machinery costs;
- memory: the service, its spawner and `--idle` idle warm containers of that policy (the
  pool filled to that size), as the sum of their proportional set sizes (PSS: shared pages
  counted once);
- with --profile: the service's CPU per warm run by layer (loadtest/httpprofile.py, needs
  py-spy).

A service of its own per policy: each memory figure weighs one policy's containers only.
Figures and ratios only, as a table; the last line is one JSON object (each policy's
figures under "policies").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import psutil

from loadtest.baseline import BenchError, Command, Loops, fastest, flat, measure, median, percentile
from loadtest.cbuild import build_exit0
from loadtest.http.driver import closed_loop
from loadtest.http.lean import LeanClient, LeanError, run_ok
from loadtest.http.service import spawned, stop_on_sigterm
from loadtest.http.stats import summary
from loadtest.http.targets import BareEnv, BareTarget, HttpTarget
from loadtest.http.workloads import WORKLOADS, Workload
from loadtest.httpprofile import profile
from loadtest.httpprofile import table as profile_table
from loadtest.rows import OwnTime, Row, loop_bases, own_time_rows, policies_arg, table
from testbed import busybox

TRUE = WORKLOADS["exec"]  # busybox true, one exec, no shell
# No libc (loadtest/cbuild.py), added to the image's /bin for this benchmark.
EXIT0 = Workload("exit0", "exit(0) executed directly, no libc: a run's cost apart from the "
                 "program's own start", "", argv=("/bin/exit0",))
POLICIES = ("judge", "default")
FILL_TIMEOUT_S = 120.0
THROUGHPUT = 8                 # clients at once for runs/s
TIGHT_RUNS_PER_CLIENT = 250    # the tight loops' runs per worker at THROUGHPUT


async def _latency(target: HttpTarget | BareTarget, n: int) -> dict[str, Any]:
    phase = await closed_loop(target.send, 1, requests=n)
    return summary(phase.recorder, phase.elapsed_s, False)


def _lean_latency(url: str, image: str, workload: Workload, n: int) -> dict[str, Any]:
    """n runs one after the other from the lean client: median and p99 (ms), runs/s."""
    lat: list[float] = []
    with LeanClient(url) as client:
        request = client.request("POST", "/v1/runs", orjson.dumps(workload.run_body(image, 0)))
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            try:
                run_ok(client, request)
            except LeanError as e:
                raise BenchError(str(e)) from None
            lat.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - start
    return {"warm_run_median_ms": round(median(lat), 3),
            "warm_run_p99_ms": round(percentile(lat, 99), 3),
            "runs_per_s_sequential": round(n / elapsed, 1)}


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


def _wait_idle(url: str, policy: str, want: int) -> int:
    deadline = time.monotonic() + FILL_TIMEOUT_S
    idle = 0
    while time.monotonic() < deadline:
        idle = sum(int(p.get("idle", 0)) for p in _info(url).get("pools", [])
                   if p.get("policy") == policy)
        if idle >= want:
            break
        time.sleep(0.5)
    return idle


async def _first_run(url: str, image: str, workload: Workload) -> None:
    async with HttpTarget(url, None, image, workload, 1, 300.0) as http:
        outcome = await http.send(0)
    if not outcome.ok:
        raise SystemExit(f"the first run failed: {outcome.error or outcome.status}")


async def _measure(url: str, image: str, workload: Workload, requests: int, seconds: float,
                   bare_env: BareEnv) -> dict[str, Any]:
    async with HttpTarget(url, None, image, workload, 8, 60.0) as http, \
            BareTarget(bare_env, TRUE, 8) as bare:
        warm = await _latency(http, requests)
        bare_lat = await _latency(bare, requests)
        rate = await _throughput(http, seconds)
        bare_rate = await _throughput(bare, seconds)
    return {
        "aiohttp_warm_run_median_ms": warm["latency_ms"]["p50"],
        "aiohttp_warm_run_p99_ms": warm["latency_ms"]["p99"],
        "warm_run_errors": warm["errors"],
        "client_bare_median_ms": bare_lat["latency_ms"]["p50"],
        "client_bare_p99_ms": bare_lat["latency_ms"]["p99"],
        "runs_per_s": round(rate, 1),
        "client_bare_runs_per_s": round(bare_rate, 1),
    }


def _ok_runs(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'^sandboxd_runs_total\{status="ok"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _ab_rate(url: str, image: str, workload: Workload, seconds: float) -> float | None:
    """Runs/s at THROUGHPUT clients from ApacheBench (keep-alive, one fixed body); None
    without `ab`."""
    ab = shutil.which("ab")
    if ab is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(orjson.dumps(workload.run_body(image, 0)))
        body.flush()
        before = _ok_runs(url)
        limit = str(max(1, round(seconds)))  # whole seconds: ab reads 0 as no limit
        done = subprocess.run([ab, "-q", "-k", "-c", str(THROUGHPUT), "-t", limit, "-p",
                               body.name, "-T", "application/json", url + "/v1/runs"],
                              capture_output=True, text=True, timeout=seconds + 120,
                              check=False)
    if done.returncode != 0:
        raise BenchError(f"ab failed: {done.stderr.strip()[-500:]}")

    def figure(label: str) -> float:
        found = re.search(rf"^{label}:\s+([\d.]+)", done.stdout, re.M)
        return float(found.group(1)) if found else 0.0
    complete, non_2xx = figure("Complete requests"), figure("Non-2xx responses")
    ok = _ok_runs(url) - before
    # ab counts a request it abandoned at its time limit; the service may have run it.
    if non_2xx or not complete - THROUGHPUT <= ok <= complete + THROUGHPUT:
        raise BenchError(f"ab: {complete:g} answers, {non_2xx:g} not 200, but {ok:g} runs "
                         "ok by the service's count")
    return round(figure("Requests per second"), 1)


async def _profiled(url: str, image: str, workload: Workload, pid: int, n: int,
                    raw_out: Path | None) -> dict[str, Any]:
    async with HttpTarget(url, None, image, workload, 1, 60.0) as http:
        async def runs(k: int) -> float:
            phase = await closed_loop(http.send, 1, requests=k)
            if phase.recorder.failed:
                raise BenchError(f"profiled runs failed: {phase.recorder.errors}")
            return phase.elapsed_s
        return await profile(pid, runs, n, raw_out)


@dataclass(frozen=True)
class Counts:
    requests: int        # sequential runs (latency), and the tight loop's 1-at-once runs
    seconds: float       # each throughput phase
    idle: int            # idle warm containers weighed
    profile_runs: int    # sequential runs under the profiler (0: no profile)


@dataclass(frozen=True)
class Bares:
    """The tight loops measured while a policy's service sat idle."""

    one: Loops       # busybox true, 1 at once
    many: Loops      # THROUGHPUT at once
    exit0: Loops     # exit0, 1 at once


def measure_policy(policy: str, n: Counts, bare_env: BareEnv, exit0: Path,
                   profile_out: Path | None) -> tuple[dict[str, Any], Bares]:
    """One policy's figures, from a service of its own whose image has `exit0` in /bin,
    and the tight loops measured while it sat idle."""
    workload = replace(TRUE, policy=policy)
    true = Command(str(bare_env.root / "bin" / "busybox"), tuple(TRUE.command),
                   {"PATH": str(bare_env.root / "bin")})
    with spawned(max(n.idle, THROUGHPUT), min_idle=n.idle, programs=(exit0,)) as svc:
        asyncio.run(_first_run(svc.url, svc.image, workload))  # the pool fills to `idle`
        filled = _wait_idle(svc.url, policy, n.idle)
        memory = round(_pss_mib(svc.pid), 1)
        bares = Bares(measure(true, n.requests),
                      measure(true, THROUGHPUT * TIGHT_RUNS_PER_CLIENT, THROUGHPUT),
                      measure(Command(str(exit0), ("exit0",), {}), n.requests))
        fig = _lean_latency(svc.url, svc.image, workload, n.requests)
        fig |= {f"exit0_{k}": v for k, v in _lean_latency(
            svc.url, svc.image, replace(EXIT0, policy=policy), n.requests).items()}
        fig |= asyncio.run(_measure(svc.url, svc.image, workload, n.requests, n.seconds,
                                    bare_env))
        if (ab_rate := _ab_rate(svc.url, svc.image, workload, n.seconds)) is not None:
            fig["runs_per_s_ab"] = ab_rate
        # Warm means served by a pooled container: the pool's own count says so.
        pools = [p for p in _info(svc.url).get("pools", []) if p.get("policy") == policy]
        fig["pool_hits"] = sum(int(p.get("hits", 0)) for p in pools)
        fig["pool_misses"] = sum(int(p.get("misses", 0)) for p in pools)
        fig["idle_containers"] = filled
        fig[f"idle_rss_mib_{n.idle}"] = memory
        if n.profile_runs:
            fig["http_profile"] = asyncio.run(_profiled(svc.url, svc.image, workload,
                                                        svc.pid, n.profile_runs, profile_out))
    fig |= (flat("bare_exec", bares.one) | flat(f"bare_exec_{THROUGHPUT}_at_once", bares.many)
            | flat("bare_exit0", bares.exit0))
    fig["bare_runs_per_s"] = round(fastest(bares.many, "runs_per_s").runs_per_s, 1)
    fig["warm_vs_bare_median"] = round(fig["warm_run_median_ms"]
                                       / fig["bare_exec_median_ms"], 2)
    # The sandbox's own time per run: what it adds to each program's fastest bare run.
    fig["warm_over_bare_ms"] = round(fig["warm_run_median_ms"] - fig["bare_exec_median_ms"], 3)
    fig["exit0_warm_over_bare_ms"] = round(fig["exit0_warm_run_median_ms"]
                                           - fig["bare_exit0_median_ms"], 3)
    fig["warm_vs_bare_p99"] = round(fig["warm_run_p99_ms"] / fig["bare_exec_p99_ms"], 2)
    fig["runs_per_s_vs_bare"] = round(fig["runs_per_s"] / fig["bare_runs_per_s"], 3)
    fig["warm_vs_client_bare_median"] = round(fig["aiohttp_warm_run_median_ms"]
                                              / fig["client_bare_median_ms"], 2)
    fig["runs_per_s_vs_client_bare"] = round(fig["runs_per_s"]
                                             / fig["client_bare_runs_per_s"], 3)
    return fig, bares


def profile_path(out: Path | None, policy: str) -> Path | None:
    """--profile-out RAW, one file per policy: RAW's name with the policy before its suffix."""
    return None if out is None else out.with_name(f"{out.stem}.{policy}{out.suffix}")


def policy_rows(policy: str, fig: dict[str, Any], n: Counts, bares: Bares) -> list[Row]:
    """The figures of one policy, each beside the tight loops and the client's own loop."""
    one, many = bares.one, bares.many
    return [
        Row(f"{policy}: warm run median (ms)", fig["warm_run_median_ms"],
            loop_bases(one, "p50")),
        Row(f"{policy}: warm run p99 (ms)", fig["warm_run_p99_ms"], loop_bases(one, "p99")),
        Row(f"{policy}: warm run median, aiohttp client (ms)",
            fig["aiohttp_warm_run_median_ms"],
            (*loop_bases(one, "p50"), ("client loop", fig["client_bare_median_ms"]))),
        Row(f"{policy}: warm run p99, aiohttp client (ms)", fig["aiohttp_warm_run_p99_ms"],
            (*loop_bases(one, "p99"), ("client loop", fig["client_bare_p99_ms"]))),
        *own_time_rows(policy, "warm run", OwnTime(
            fig["exit0_warm_run_median_ms"], fig["exit0_warm_run_p99_ms"],
            fig["warm_over_bare_ms"], fig["exit0_warm_over_bare_ms"]), bares.exit0),
        Row(f"{policy}: warm runs/s, 1 client", fig["runs_per_s_sequential"],
            loop_bases(one, "runs_per_s")),
        Row(f"{policy}: warm runs/s, {THROUGHPUT} clients", fig["runs_per_s"],
            (*loop_bases(many, "runs_per_s", f" {THROUGHPUT} at once"),
             ("client loop", fig["client_bare_runs_per_s"]))),
        *([Row(f"{policy}: warm runs/s, {THROUGHPUT} clients of ab (C)", fig["runs_per_s_ab"],
               loop_bases(many, "runs_per_s", f" {THROUGHPUT} at once"))]
          if "runs_per_s_ab" in fig else []),
        Row(f"{policy}: service + {fig['idle_containers']} idle containers, PSS (MiB)",
            fig[f"idle_rss_mib_{n.idle}"]),
    ]


def run(policies: tuple[str, ...], n: Counts,
        profile_out: Path | None = None) -> tuple[list[Row], dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="sandboxd-bench-api-"))
    rows: list[Row] = []
    per_policy: dict[str, dict[str, Any]] = {}
    try:
        bare_env = BareEnv(busybox.build_rootfs(base / "rootfs"), base / "scratch")
        bare_env.scratch.mkdir()
        exit0 = build_exit0(base)
        for policy in policies:
            fig, bares = measure_policy(policy, n, bare_env, exit0,
                                        profile_path(profile_out, policy))
            per_policy[policy] = fig
            rows += policy_rows(policy, fig, n, bares)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows, {"policy_list": list(policies), "requests": n.requests,
                  "seconds": n.seconds, "idle": n.idle,
                  "memory_measure": "PSS sum: service + spawner + idle containers' inits",
                  "policies": per_policy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.api", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=policies_arg, default=POLICIES,
                    help="policies to measure, comma-separated (default: judge,default)")
    ap.add_argument("--requests", type=int, default=500, help="sequential runs (latency)")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput phase length")
    ap.add_argument("--idle", type=int, default=100, help="idle warm containers to weigh")
    ap.add_argument("--profile", action="store_true",
                    help="then the service's CPU per warm run by layer, under py-spy")
    ap.add_argument("--profile-runs", type=int, default=3000,
                    help="sequential runs under the profiler")
    ap.add_argument("--profile-out", type=Path,
                    help="write py-spy's raw stacks here, one file per policy "
                         "(api-profile.raw: api-profile.judge.raw, ...)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.quick:
        args.requests, args.seconds, args.idle, args.profile_runs = 20, 1.0, 4, 50
    if args.requests < 2 or args.seconds <= 0 or args.idle < 1 or args.profile_runs < 1:
        ap.error("--requests >= 2, --seconds > 0, --idle >= 1 and --profile-runs >= 1")
    n = Counts(args.requests, args.seconds, args.idle,
               args.profile_runs if args.profile else 0)
    try:
        rows, fig = run(args.policy, n, args.profile_out)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(f"sandboxd API benchmark: busybox `true` over HTTP, policies "
              f"{', '.join(args.policy)}, {n.requests} sequential runs, {n.seconds:g} s at "
              f"{THROUGHPUT} clients, {n.idle} idle containers")
        print(table(rows))
        for policy, figures in fig["policies"].items():
            if "http_profile" in figures:
                print(f"\n{policy}: " + profile_table(figures["http_profile"],
                                                      figures["runs_per_s_sequential"]))
    print(json.dumps(fig, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
