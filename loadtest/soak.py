"""The soak: `python -m loadtest.soak [--spawn | --url URL --image REF --pid PID]
[--runs N] [--concurrency C]`.

100,000 requests at concurrency 32 by default, closed loop, of a mix whose answers are
known in advance (loadtest/soakmix.py): on the judge policy (warm containers, reset
between runs) plain `true`, a nonzero exit, an output flood, a CPU-time loop, a memory
bomb, a fork bomb, a sleep past its wall limit, files in (inline and from the file cache)
and out (`copy_out`, `copy_out_cached`); sessions (create, exec, delete) and pulls. The
runs the service kills for a limit share warm containers with the innocent ones, so a kill
that reached the wrong run shows up as a wrong verdict.

First a warm-up (--warmup requests, 5 % by default), then the service is left to settle
and looked at (loadtest/soakcheck.py: its RSS, descriptors, processes, mounts, cgroups,
store, temporary files, sessions); then the rest, and the same look at the end. The soak
holds when every request was answered, every answer was well-formed and exactly its
verdict, nothing grew or was left (RSS and descriptors within 5 % of their level after
warm-up) and the p99 of the last tenth of the requests is within 10 % of the first
tenth's after warm-up.

--spawn starts its own registry and `sandboxd serve` (a warm pool of --concurrency
containers kept full, so the two looks see the same pool); --url (loopback only), --image
(a busybox image it can pull) and --pid (its process, for the host's side) name a running
service. Beside it, in the same run, the bare baseline of every benchmark
(loadtest.baseline). Figures and the failures found; the last line is one JSON object.
The exit status is 1 when the soak did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import BenchError, Command, fastest, flat, measure, percentile
from loadtest.http.driver import closed_loop
from loadtest.http.service import (
    LoadTestError,
    add_target_args,
    check_loopback,
    spawned,
    stop_on_sigterm,
)
from loadtest.http.stats import Outcome, Recorder, percentiles_ms
from loadtest.output import emit
from loadtest.soakcheck import Level, Service, SoakCheckError, cgroups_left, leaks
from loadtest.soakmix import MIX, Case, Context, SoakSetupError, prepare, schedule
from testbed import busybox

DEFAULT_RUNS = 100_000
DEFAULT_CONCURRENCY = 32
WARMUP_SHARE = 0.05
SAMPLES = 20                 # failures kept of each kind
BARE_RUNS = 2_000            # at most: the baseline's figures settle long before that
P99_WINDOWS = 10             # p99 after warm-up: the first tenth of the rest; at the end: the last
P99_GOAL = 1.10
USAGE_EVERY_S = 5.0          # the service's RSS and descriptors, sampled during the soak
LOAD_SETTLE_S = 60.0         # RSS under load is compared from this far into the load
KINDS = ("unanswered", "wrong_verdict", "malformed", "error")


def kind(outcome: Outcome) -> str:
    """What a failed request was: no answer, a wrong or malformed one, or an error status."""
    if outcome.http == "transport":
        return "unanswered"
    if outcome.status in ("wrong_verdict", "malformed"):
        return outcome.status
    return "error"


@dataclass
class Tally:
    """Every request's outcome and latency, by case and by kind of failure."""

    plan: list[Case]
    latency_s: list[float] = field(init=False)
    all: Recorder = field(default_factory=Recorder)
    cases: dict[str, Recorder] = field(default_factory=lambda: {c.name: Recorder()
                                                                for c in MIX})
    failures: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    failed: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.latency_s = [0.0] * len(self.plan)

    async def send(self, ctx: Context, seq: int) -> Outcome:
        case = self.plan[seq]
        start = time.monotonic()
        try:
            outcome = await case.send(ctx, seq)
        except (aiohttp.ClientError, TimeoutError) as e:
            outcome = Outcome(False, "transport", "transport",
                              f"{case.name}: no answer: {type(e).__name__}: {e}")
        except Exception as e:  # an answer the checks could not read is counted, not lost
            outcome = Outcome(False, "?", "unreadable",
                              f"{case.name}: {type(e).__name__}: {e}")
        elapsed = time.monotonic() - start
        self.latency_s[seq] = elapsed
        self.all.add(outcome, elapsed, elapsed, 0.0)
        self.cases[case.name].add(outcome, elapsed, elapsed, 0.0)
        if not outcome.ok:
            k = kind(outcome)
            self.failed[k] += 1
            if len(self.failures[k]) < SAMPLES:
                self.failures[k].append(outcome.error or f"{outcome.http} {outcome.status}")
        return outcome


def p99_ms(latency_s: list[float]) -> float:
    return round(percentile(latency_s, 99) * 1000, 3)


def tail(latency_s: list[float], warmup: int) -> dict[str, Any]:
    """p99 of the first and the last tenth of the requests after warm-up."""
    rest = latency_s[warmup:]
    window = max(1, len(rest) // P99_WINDOWS)
    first, last = p99_ms(rest[:window]), p99_ms(rest[-window:])
    ratio = round(last / first, 3) if first else 0.0
    return {"p99_window": window, "p99_after_warmup_ms": first, "p99_end_ms": last,
            "p99_end_vs_after_warmup": ratio}


@dataclass
class Usage:
    """The service's RSS and descriptors through the soak."""

    service: Service
    samples: list[list[float]] = field(default_factory=list)   # [s, RSS MiB, fds]
    last: float = -USAGE_EVERY_S

    def tick(self, _rec: Recorder, t: float) -> None:
        if t - self.last >= USAGE_EVERY_S:
            rss, fds = self.service.usage()
            self.samples.append([round(t, 1), round(rss / 2**20, 2), fds])
            self.last = t


async def _phase(tally: Tally, ctx: Context, first: int, count: int, concurrency: int,
                 usage: Usage | None = None) -> float:
    async def send(i: int) -> Outcome:
        return await tally.send(ctx, first + i)
    phase = await closed_loop(send, concurrency, requests=count,
                              tick=usage.tick if usage else None)
    return phase.elapsed_s


def _client(token: str | None, connections: int, timeout_s: float) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return aiohttp.ClientSession(headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 connector=aiohttp.TCPConnector(limit=connections))


def _under_load(samples: list[list[float]]) -> list[float] | None:
    """RSS (MiB) a minute into the load after warm-up and at its end."""
    settled = [s for s in samples if s[0] >= LOAD_SETTLE_S]
    return [settled[0][1], settled[-1][1]] if len(settled) > 1 else None


def _level_figures(service: Service, a: Level, b: Level) -> dict[str, Any]:
    return {"after_warmup": a.figures(), "end": b.figures(),
            "cgroup_base": str(service.cgroup_base) if service.cgroup_base else None,
            "containers_at_end": sorted(b.records),
            "rss_change": round(b.rss / a.rss - 1, 4),
            "fds_change": round(b.fds / a.fds - 1, 4)}


async def soak(url: str, token: str | None, image: str, pid: int, runs: int,
               concurrency: int, *, warmup: int | None = None, idle: int | None = None,
               seed: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
    """The soak's figures: every failure by kind (with samples), what leaked, latencies and
    the p99 after warm-up and at the end, the service's levels. `idle`: the warm pool the
    service keeps when quiet (its min_idle), when known."""
    warm = warmup if warmup is not None else max(min(concurrency, runs // 2),
                                                  int(runs * WARMUP_SHARE))
    if not 0 < warm < runs:
        raise LoadTestError(f"--warmup {warm}: give fewer than --runs ({runs}) and at least 1")
    plan = schedule(runs, seed)
    tally = Tally(plan)

    async def load(first: int, count: int, usage: Usage | None = None) -> float:
        # A client of its own per phase, closed before the service is looked at: its
        # idle keep-alive connections would be the service's descriptors.
        async with _client(token, concurrency, timeout_s) as http:
            return await _phase(tally, replace(ctx, http=http), first, count, concurrency,
                                usage)

    async with _client(token, 1, timeout_s) as probe:
        ctx = await prepare(probe, url, image)
        service = await Service.attach(url, probe, pid)
        usage = Usage(service)
        await load(0, warm)
        quiet_after_warmup = await service.quiet(idle)
        after_warmup = await service.level(ctx.containers)
        elapsed = await load(warm, runs - warm, usage)
        quiet_at_end = await service.quiet(idle)
        end = await service.level(ctx.containers)
    found = leaks(after_warmup, end)
    if not (quiet_after_warmup and quiet_at_end):
        found.append("the service did not settle (runs running, or its containers and "
                     "processes changing) within the wait: the levels may differ for that")
    rec = tally.all
    timing = tail(tally.latency_s, warm)
    return {
        "runs": rec.count, "concurrency": concurrency, "seed": seed, "warmup": warm,
        "answered": rec.count - tally.failed["unanswered"],
        "unanswered": tally.failed["unanswered"],
        "wrong_verdicts": tally.failed["wrong_verdict"],
        "malformed": tally.failed["malformed"], "errors": tally.failed["error"],
        "samples": {k: v for k, v in tally.failures.items() if v},
        "leaks": found,
        "mix": dict(Counter(c.name for c in plan)),
        "pool": dict(rec.pool_hits),
        "elapsed_s": round(elapsed, 3),
        "runs_per_s": round((runs - warm) / elapsed, 1),
        "latency_ms": percentiles_ms(rec.latency),
        "latency_ms_by_case": {name: {k: v for k, v in percentiles_ms(r.latency).items()
                                      if k in ("p50", "p99", "max")}
                               for name, r in tally.cases.items() if r.count},
        **timing,
        "service": _level_figures(service, after_warmup, end),
        "usage": usage.samples,
        # The service trims only at rest, where the looks are: under load, the creep the
        # looks do not see (from a minute in: the trim's pages come back in the first).
        "rss_under_load_mib": _under_load(usage.samples),
        "rss_max_mib": max((s[1] for s in usage.samples), default=None),
        "fds_max": max((s[2] for s in usage.samples), default=None),
    }


def goals(fig: dict[str, Any]) -> dict[str, bool]:
    """The issue's standard: 0 lost, every answer right and well-formed, 0 leaked, p99 at
    the end within 10 % of p99 after warm-up."""
    return {"none_lost": fig["unanswered"] == 0,
            "every_answer_right": not (fig["wrong_verdicts"] or fig["malformed"]
                                       or fig["errors"]),
            "none_leaked": not fig["leaks"],
            "p99_held": 0 < fig["p99_end_vs_after_warmup"] <= P99_GOAL}


def bare(runs: int, concurrency: int) -> dict[str, Any]:
    """The baseline: the bare loops of busybox `true`, one at a time (latency) and
    `concurrency` at once (runs/s)."""
    work = Path(tempfile.mkdtemp(prefix="sandboxd-soak-bare-"))
    try:
        true = Command(str(busybox.build_rootfs(work / "rootfs") / "bin" / "true"), ("true",))
        one = measure(true, runs)
        many = measure(true, max(runs, concurrency), concurrency)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**flat("bare_exec", one), **flat(f"bare_exec_{concurrency}_at_once", many),
            "bare_runs_per_s": round(fastest(many, "runs_per_s").runs_per_s, 1)}


def figures(found: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    true = found["latency_ms_by_case"].get("true", {})
    fig = {**found, **base,
           "runs_per_s_vs_bare": round(found["runs_per_s"] / base["bare_runs_per_s"], 4)}
    if true:
        fig["true_median_vs_bare"] = round(true["p50"] / base["bare_exec_median_ms"], 2)
    fig["goals"] = goals(found)
    return fig


def _report(fig: dict[str, Any]) -> None:
    for k, lines in fig["samples"].items():
        for line in lines:
            print(f"{k.upper()} {line}", file=sys.stderr)
    for line in fig["leaks"]:
        print(f"LEAK {line}", file=sys.stderr)
    svc = fig["service"]
    a, b = svc["after_warmup"], svc["end"]
    print(f"{fig['runs']} requests at {fig['concurrency']}, {fig['runs_per_s']} /s after "
          f"warm-up: {fig['answered']} answered, {fig['wrong_verdicts']} wrong, "
          f"{fig['malformed']} malformed, {fig['errors']} errors; "
          f"leaks: {len(fig['leaks'])}")
    if fig["rss_under_load_mib"]:
        first, last = fig["rss_under_load_mib"]
        print(f"service RSS under load (from a minute in): {first} -> {last} MiB "
              f"({last / first - 1:+.2%})")
    print(f"service RSS {a['rss_mib']} -> {b['rss_mib']} MiB ({svc['rss_change']:+.2%}), "
          f"fds {a['fds']} -> {b['fds']} ({svc['fds_change']:+.2%}); p99 "
          f"{fig['p99_after_warmup_ms']} -> {fig['p99_end_ms']} ms "
          f"(x{fig['p99_end_vs_after_warmup']}); goals {fig['goals']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(ap)
    ap.add_argument("--pid", type=int, help="with --url: the service's process id")
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="requests in all")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                    help="requests at once")
    ap.add_argument("--warmup", type=int,
                    help=f"requests before the first look (default {WARMUP_SHARE:.0%}%)")
    ap.add_argument("--seed", type=int, default=0, help="the order of the mix")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.runs < 2 or args.concurrency < 1 or args.timeout <= 0:
        ap.error("--runs needs at least 2, --concurrency at least 1, --timeout above 0")
    if args.url and not (args.image and args.pid):
        ap.error("--url needs --image (a busybox image reference the service can pull) "
                 "and --pid (the service's process, for the host's side of the checks)")
    stop_on_sigterm()
    try:
        if args.spawn:
            c = args.concurrency
            with spawned(c, min_idle=c) as svc:
                found = asyncio.run(soak(svc.url, args.token, svc.image, svc.pid, args.runs,
                                         c, warmup=args.warmup, idle=c, seed=args.seed,
                                         timeout_s=args.timeout))
            # Stopped now: its containers' cgroups must have gone with it.
            left = cgroups_left(found["service"]["cgroup_base"],
                                found["service"]["containers_at_end"])
            if left:
                found["leaks"].append(f"container cgroups left after the service stopped: "
                                      f"{', '.join(left)}")
        else:
            found = asyncio.run(soak(check_loopback(args.url), args.token, args.image,
                                     args.pid, args.runs, args.concurrency,
                                     warmup=args.warmup, seed=args.seed,
                                     timeout_s=args.timeout))
        base = bare(min(args.runs, BARE_RUNS), args.concurrency)
    except (LoadTestError, BenchError, SoakSetupError, SoakCheckError) as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as e:
        print(f"soak failed: the service did not answer ({e}); is it running at --url?",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    fig = figures(found, base)
    if not args.json_only:
        _report(fig)
    emit(fig, args.json_only)
    return 0 if all(fig["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
