"""The isolation sweep: `python -m loadtest.sweep [--runs N] [--quick] [--json-only]`.

What each layer of sandboxd's isolation costs, measured in this process through the runtime
(no HTTP). Every variant runs two programs: busybox `true` (the fixed cost of one run) and
workloads/syscalls.c (per-syscall cost); the variants take turns, in a new random order each
round, beside a bare baseline measured in the same rounds:

- bare: posix_spawn + wait4 of the same binary, no isolation;
- full: the judge profile in a warm container (read-only root, the default seccomp policy,
  a network namespace, cgroups), exec only;
- no_seccomp, no_netns: full with seccomp "unconfined" / network "host";
- no_cgroups: full in a second Runtime started with no cgroup driver (rusage figures);
- writable_exec: the default profile (overlay root, tmpfs upper), exec in one container;
- writable_new: the default profile, a new container per run, as the pool gives one out;
- cold: the judge profile, a new container per run.

A sample is the host-side time from the call to the result; a new container's run counts
create + exec + destroy. Per variant: median and p99 ms, the ratio to bare, and the
difference to full, i.e. what the layer it removes (or adds) costs. The interleaved bare
variant pays for what the variant before it left behind (caches, the kernel's deferred
teardown); so each program also gets the tight bare loops of loadtest.baseline, measured
before the rounds, and every variant its ratio to the fastest of them. Figures only, no
verdict; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.baseline import Command, fastest, measure, median, percentile
from loadtest.http.service import stop_on_sigterm
from loadtest.output import emit
from loadtest.runtime import (
    ENV,
    LONG,
    BenchError,
    checked_exec,
    create,
    machine_info,
    ms_since,
    prepared,
    progress,
    spawn_wait,
)
from loadtest.sweep_report import table
from sandbox.errors import SandboxError
from sandbox.runtime.cgroups import Detection
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import HOST_NETWORK, UNCONFINED
from sandbox.runtime.spawnerclient import Runtime

NO_SECCOMP, HOST_NET = "sweep-no-seccomp", "sweep-host-network"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str


VARIANTS = (
    Variant("bare", "posix_spawn + wait4, no isolation"),
    Variant("full", "judge, warm: ro root, seccomp, netns, cgroups"),
    Variant("no_seccomp", "full, seccomp unconfined"),
    Variant("no_netns", "full, network host (no namespace)"),
    Variant("no_cgroups", "full, no cgroup driver (rusage)"),
    Variant("writable_exec", "default profile (overlay root), same container"),
    Variant("writable_new", "default profile, new container per run"),
    Variant("cold", "judge, new container per run"),
)

@dataclass(frozen=True)
class Layer:
    """What one layer costs per run: the median of variant `with_it` minus `without`'s."""

    name: str
    with_it: str
    without: str
    warm: bool     # both variants exec in a kept container


LAYERS = (
    Layer("seccomp", "full", "no_seccomp", warm=True),
    Layer("network namespace", "full", "no_netns", warm=True),
    Layer("cgroups", "full", "no_cgroups", warm=True),
    Layer("writable root", "writable_exec", "full", warm=True),
    Layer("new writable container", "writable_new", "writable_exec", warm=False),
    Layer("cold start (judge)", "cold", "full", warm=False),
)


@dataclass(frozen=True)
class Program:
    key: str
    label: str
    argv: tuple[str, ...]   # as the container sees it; bare runs the same file of the root


@dataclass(frozen=True)
class Counts:
    rounds: int            # samples of `true` per variant
    workload_rounds: int   # samples of syscalls.c per variant
    warmup: int            # untimed rounds before each series
    iterations: int        # syscalls.c loop count


def counts(runs: int | None, quick: bool = False) -> Counts:
    rounds = runs or (5 if quick else 300)
    if quick:
        return Counts(rounds=rounds, workload_rounds=3, warmup=1, iterations=20_000)
    return Counts(rounds=rounds, workload_rounds=max(3, rounds // 6), warmup=5,
                  iterations=500_000)


@dataclass(frozen=True)
class Sample:
    wall_ms: float
    cpu_ms: float | None
    cpu_by: str


Sampler = Callable[[tuple[str, ...]], Awaitable[Sample]]


def bare(root: Path) -> Sampler:
    async def run(argv: tuple[str, ...]) -> Sample:
        wall, cpu = spawn_wait(root / argv[0].lstrip("/"), list(argv))
        return Sample(wall, cpu, "rusage")
    return run


def warm(c: Container) -> Sampler:
    async def run(argv: tuple[str, ...]) -> Sample:
        t0 = time.monotonic_ns()
        r = await checked_exec(c, list(argv), LONG)
        return Sample(ms_since(t0), r.cpu_ms, str(r.measured_by.get("cpu")))
    return run


def new_each_time(runtime: Runtime, root: Path, profile: str) -> Sampler:
    async def run(argv: tuple[str, ...]) -> Sample:
        t0 = time.monotonic_ns()
        c = await create(runtime, root, profile)
        try:
            r = await checked_exec(c, list(argv), LONG)
        finally:
            await c.destroy()
        return Sample(ms_since(t0), r.cpu_ms, str(r.measured_by.get("cpu")))
    return run


async def samplers(stack: contextlib.AsyncExitStack, runtime: Runtime,
                   root: Path) -> dict[str, Sampler]:
    """One sampler per variant; every container (and the cgroup-less runtime) is closed by
    `stack`."""
    judge = runtime.policies.profile("judge")
    runtime.policies.register(dataclasses.replace(judge, name=NO_SECCOMP, seccomp=UNCONFINED))
    runtime.policies.register(dataclasses.replace(judge, name=HOST_NET, network=HOST_NETWORK))
    plain = await Runtime.start(mapping=runtime.mapping, cgroups=Detection(
        driver=None, warnings=("the isolation sweep's runtime without cgroups",)))
    stack.push_async_callback(plain.close)

    async def kept(rt: Runtime, profile: str) -> Sampler:
        c = await create(rt, root, profile)
        stack.push_async_callback(c.destroy)
        return warm(c)

    return {
        "bare": bare(root),
        "full": await kept(runtime, "judge"),
        "no_seccomp": await kept(runtime, NO_SECCOMP),
        "no_netns": await kept(runtime, HOST_NET),
        "no_cgroups": await kept(plain, "judge"),
        "writable_exec": await kept(runtime, "default"),
        "writable_new": new_each_time(runtime, root, "default"),
        "cold": new_each_time(runtime, root, "judge"),
    }


async def series(run: dict[str, Sampler], argv: tuple[str, ...], rounds: int, warmup: int,
                 rng: random.Random) -> dict[str, list[Sample]]:
    """`rounds` samples of every variant, interleaved in a new order each round so that
    drift on the machine (other load, frequency) falls on all of them alike."""
    out: dict[str, list[Sample]] = {k: [] for k in run}
    order = list(run)
    for i in range(warmup + rounds):
        rng.shuffle(order)
        for key in order:
            sample = await run[key](argv)
            if i >= warmup:
                out[key].append(sample)
    return out


def figures(samples: dict[str, list[Sample]], tight_ms: float) -> dict[str, dict[str, Any]]:
    """Per variant; `tight_ms` is the fastest tight bare loop's median."""
    walls = {k: [s.wall_ms for s in v] for k, v in samples.items()}
    base, full = median(walls["bare"]), median(walls["full"])
    out = {}
    for key, wall in walls.items():
        cpu = [s.cpu_ms for s in samples[key] if s.cpu_ms is not None]
        m = median(wall)
        out[key] = {"median_ms": m, "p99_ms": percentile(wall, 99),
                    "cpu_median_ms": median(cpu) if cpu else None,
                    "ratio_vs_bare": m / base, "ratio_vs_fastest_bare": m / tight_ms,
                    "delta_vs_full_ms": m - full,
                    "runs": len(wall), "cpu_measured_by": samples[key][-1].cpu_by}
    return out


def layer_cost(figs: dict[str, dict[str, Any]], layer: Layer) -> dict[str, float | None]:
    """Median host-side time and CPU time of `with_it` minus those of `without` (ms)."""
    a, b = figs[layer.with_it], figs[layer.without]
    cpu = (None if a["cpu_median_ms"] is None or b["cpu_median_ms"] is None
           else a["cpu_median_ms"] - b["cpu_median_ms"])
    return {"wall": a["median_ms"] - b["median_ms"], "cpu": cpu}


async def sweep(n: Counts, quiet: bool, seed: int) -> dict[str, Any]:
    programs = (Program("true", "busybox `true`", ("/bin/true",)),
                Program("syscalls", f"syscalls.c, {n.iterations} getppid+read iterations",
                        ("/bin/syscalls", str(n.iterations))))
    rng = random.Random(seed)
    async with prepared() as (runtime, root), contextlib.AsyncExitStack() as stack:
        result: dict[str, Any] = {
            "benchmark": "isolation_sweep", **machine_info(runtime), "seed": seed,
            "warmup_rounds": n.warmup, "programs": {}, "variants": {},
            "layers": [dataclasses.asdict(layer) for layer in LAYERS], "layer_cost_ms": {}}
        # The tight loops first, while no container is up.
        tight = {p.key: measure(Command(str(root / p.argv[0].lstrip("/")),
                                        (Path(p.argv[0]).name, *p.argv[1:]), ENV),
                                n.rounds if p.key == "true" else n.workload_rounds,
                                warmup=n.warmup)
                 for p in programs}
        run = await samplers(stack, runtime, root)
        for p in programs:
            rounds = n.rounds if p.key == "true" else n.workload_rounds
            progress(quiet, f"{p.label}: {rounds} rounds of {len(run)} variants")
            figs = figures(await series(run, p.argv, rounds, n.warmup, rng),
                           fastest(tight[p.key]).median_ms)
            result["programs"][p.key] = {
                "label": p.label, "argv": list(p.argv), "rounds": rounds,
                "tight_bare": {m: loop.figures() for m, loop in tight[p.key].items()}}
            for v in VARIANTS:
                entry = result["variants"].setdefault(v.key, {"label": v.label})
                entry[p.key] = figs[v.key]
            result["layer_cost_ms"][p.key] = {la.name: layer_cost(figs, la) for la in LAYERS}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, help="rounds of `true` per variant (default 300; "
                    "syscalls.c gets a sixth of them, at least 3)")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--seed", type=int, default=0, help="for the order of each round")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.runs is not None and args.runs < 2:
        ap.error("--runs needs at least 2")
    try:
        result = asyncio.run(sweep(counts(args.runs, args.quick), args.json_only, args.seed))
    except (BenchError, SandboxError) as e:
        print(f"isolation sweep failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(table(result))
    emit(result, json_only=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
