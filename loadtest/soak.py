"""The soak: `python -m loadtest.soak [--spawn | --url URL --image REF] [--runs N]`.

A mix of runs whose verdicts are known in advance goes through POST /v1/runs on the judge
policy (warm containers, reset between runs), closed loop at --concurrency: plain `true`,
a nonzero exit, an output flood cut at output_bytes 4096, an endless loop cut at cpu_ms 50,
a memory bomb, a fork bomb stopped by its pids limit and a sleep cut at wall_ms 100. Every
result is checked against the verdict its program must get (status and exit code). The
runs the service kills for a limit share warm containers with the innocent ones, so a kill
that reached the wrong run shows up here as a wrong verdict: there must be none.

Beside it, in the same run, the bare baseline of every benchmark (loadtest.baseline): the
tight fork+exec and posix_spawn loops of the same busybox `true`, one at a time for latency
and --concurrency at once for runs/s.

--spawn starts its own registry and `sandboxd serve` (as `python -m loadtest --spawn`);
--url (loopback only) and --image name a running service and a busybox image it can pull.
Figures, ratios and the wrong verdicts; the last line is one JSON object. The exit status
is 1 when a verdict was wrong or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from loadtest.baseline import BenchError, Command, fastest, flat, measure
from loadtest.http.driver import closed_loop
from loadtest.http.service import (
    LoadTestError,
    add_target_args,
    check_loopback,
    spawned,
    stop_on_sigterm,
)
from loadtest.http.stats import Outcome, Recorder, percentiles_ms
from loadtest.http.targets import HttpTarget, answer
from loadtest.http.workloads import MiB, Workload
from loadtest.output import emit
from testbed import busybox

DEFAULT_RUNS = 20_000
DEFAULT_CONCURRENCY = 16
WRONG_SAMPLES = 20
BARE_RUNS = 2_000            # at most: the baseline's figures settle long before that
# Room for every kill to be seen on a loaded 2-core machine, within the judge maxima.
_WALL_MS = 20_000


@dataclass(frozen=True)
class Case:
    """One kind of run in the mix and the verdict it must get."""

    workload: Workload
    status: str
    exit_code: int | None        # None: ended by a signal (the service's kill, or its own)
    weight: int                  # its share of the mix

    @property
    def name(self) -> str:
        return self.workload.name

    def wrong(self, doc: dict[str, Any]) -> str | None:
        """What is wrong with this run's result, or None when it is the expected verdict."""
        if (doc.get("status"), doc.get("exit_code")) == (self.status, self.exit_code):
            return None
        return (f"{self.name}: expected {self.status} exit {self.exit_code}, got "
                f"{doc.get('status')} exit {doc.get('exit_code')} signal {doc.get('signal')} "
                f"(pool_hit {doc.get('pool_hit')}, wall {doc.get('wall_ms')} ms, "
                f"id {doc.get('id')})")


def _case(name: str, measures: str, status: str, exit_code: int | None, weight: int, *,
          script: str = "", argv: tuple[str, ...] | None = None,
          **limits: int) -> Case:
    return Case(Workload(name, measures, script, argv=argv,
                         limits={"wall_ms": _WALL_MS, **limits}),
                status, exit_code, weight)


# `true` is the innocent run the others' kills must never reach; output floods and CPU
# loops are the kills that reached it before (issue #10), so they come often too.
MIX: tuple[Case, ...] = (
    _case("true", "busybox true, executed directly", "ok", 0, 8, argv=("true",)),
    _case("exit3", "a shell that exits 3", "nonzero_exit", 3, 2, script="exit 3"),
    _case("flood", "yes, cut at output_bytes 4096", "output_limit", None, 4,
          argv=("yes",), output_bytes=4096),
    _case("spin", "an endless shell loop, cut at cpu_ms 50", "time_limit", None, 3,
          script="while :; do :; done", cpu_ms=50),
    _case("memory", "dd into a 64 MiB buffer, cut at memory_bytes 16 MiB", "memory_limit",
          None, 1, script='"$BIN/dd" if=/dev/zero of=/dev/null bs=64M count=1',
          memory_bytes=16 * MiB),
    # The shell's fork fails at the limit (it exits 2); the children it left are the run's
    # to end, by the end-of-run kill.
    _case("forkbomb", "a shell forking sleepers until pids 8 refuses", "nonzero_exit", 2, 1,
          script='while :; do "$BIN/sleep" 30 & done', pids=8),
    _case("sleep", "sleep 30, cut at wall_ms 100", "wall_limit", None, 1,
          argv=("sleep", "30"), wall_ms=100),
)


def schedule(runs: int, seed: int) -> list[Case]:
    """`runs` cases in the mix's proportions, in an order fixed by `seed`."""
    cycle = [c for c in MIX for _ in range(c.weight)]
    plan = [cycle[i % len(cycle)] for i in range(runs)]
    random.Random(seed).shuffle(plan)
    return plan


class SoakTarget(HttpTarget):
    """POST /v1/runs of the scheduled cases; each result checked for its verdict."""

    def __init__(self, url: str, token: str | None, image: str, plan: list[Case],
                 connections: int, timeout_s: float) -> None:
        super().__init__(url, token, image, plan[0].workload, connections, timeout_s)
        self.plan = plan
        self.wrong: list[str] = []
        self.cases = {c.name: Recorder() for c in MIX}

    async def send(self, seq: int) -> Outcome:
        case = self.plan[seq]
        start = time.monotonic()
        body = orjson.dumps(case.workload.run_body(self.image, seq))
        async with self.session.post(self.url, data=body) as resp:
            doc = answer(resp.status, await resp.read())
        if isinstance(doc, Outcome):
            outcome = doc
        else:
            hit = doc.get("pool_hit") if isinstance(doc.get("pool_hit"), bool) else None
            why = case.wrong(doc)
            if why is not None:
                self.wrong.append(why)
            outcome = Outcome(why is None, "200", str(doc.get("status")) if why is None
                              else "wrong_verdict", why or "", hit)
        elapsed = time.monotonic() - start
        self.cases[case.name].add(outcome, elapsed, elapsed, 0.0)
        return outcome


async def soak(url: str, token: str | None, image: str, runs: int, concurrency: int, *,
               seed: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
    """The soak's figures: wrong verdicts (with samples), errors, runs/s, latencies."""
    plan = schedule(runs, seed)
    async with SoakTarget(url, token, image, plan, concurrency, timeout_s) as target:
        phase = await closed_loop(target.send, concurrency, requests=runs)
    rec = phase.recorder
    wrong = len(target.wrong)
    return {
        "runs": rec.count, "concurrency": concurrency, "seed": seed,
        "wrong_verdicts": wrong,
        "errors": rec.failed - wrong,
        "wrong_samples": target.wrong[:WRONG_SAMPLES],
        "error_samples": [e for e in rec.errors if e not in target.wrong],
        "mix": dict(Counter(c.name for c in plan)),
        "pool": dict(rec.pool_hits),
        "elapsed_s": round(phase.elapsed_s, 3),
        "runs_per_s": round(rec.count / phase.elapsed_s, 1),
        "latency_ms": percentiles_ms(rec.latency),
        "latency_ms_by_case": {name: {k: v for k, v in percentiles_ms(r.latency).items()
                                      if k in ("p50", "p99", "max")}
                               for name, r in target.cases.items() if r.count},
    }


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
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(ap)
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs in all")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                    help="requests at once")
    ap.add_argument("--seed", type=int, default=0, help="the order of the mix")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.concurrency < 1 or args.timeout <= 0:
        ap.error("--runs and --concurrency need at least 1, --timeout above 0")
    if args.url and not args.image:
        ap.error("--url needs --image: a busybox image reference the service can pull")
    stop_on_sigterm()
    try:
        if args.spawn:
            with spawned(max(4, args.concurrency)) as svc:
                found = asyncio.run(soak(svc.url, args.token, svc.image, args.runs,
                                         args.concurrency, seed=args.seed,
                                         timeout_s=args.timeout))
        else:
            found = asyncio.run(soak(check_loopback(args.url), args.token, args.image,
                                     args.runs, args.concurrency, seed=args.seed,
                                     timeout_s=args.timeout))
        base = bare(min(args.runs, BARE_RUNS), args.concurrency)
    except (LoadTestError, BenchError) as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    fig = figures(found, base)
    if not args.json_only:
        for line in fig["wrong_samples"]:
            print(f"WRONG VERDICT {line}", file=sys.stderr)
    emit(fig, args.json_only)
    return 1 if fig["wrong_verdicts"] or fig["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
