"""Two trees of sandboxd side by side: `python -m loadtest.ab BASE NEW [--policy judge]
[--requests N] [--rounds R] [--burst B]`.

Each tree is a checkout with its native parts built (`python setup.py build_ext
--inplace` in it; `git worktree add` makes one of a commit). Each gets a registry and a
`sandboxd serve` of its own, started from that tree, and warm runs of busybox `true` (as
in loadtest.api) go to one and to the other in turn, B requests at a time (`--burst`, 1 by
default), the pair's order swapped every time. With bursts of one, each service has been
idle through the other's run: what a service does after an answer never delays its next
request. Bursts of several show that cost: each request after the first follows an
answer of the same service as closely as this client can send it. Whatever the machine
does meanwhile falls on both alike: on a VM whose figures move 10-30 % between two runs of
the same benchmark, a change of a few percent can be read only this way.

Per round and tree: the client's median and p99 (loadtest/http/lean.py's keep-alive client, so
that its own cost stays small), the service's CPU per run (its process, every thread), and
the median of the runs' own `cpu_ms`. NEW's rows give BASE's figure of the same round as
their first baseline; every latency row also gives the tight bare fork+exec and
posix_spawn loops of the same `true`, measured in the same run (loadtest.baseline).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from loadtest.baseline import Command, Loops, measure, median, percentile
from loadtest.http.lean import LeanClient, LeanError, run_ok
from loadtest.http.service import spawned, stop_on_sigterm
from loadtest.rows import Row, loop_bases, table
from sandbox.runtime.spawner import INIT_BINARY
from testbed import busybox

WARMUP = 300          # runs per tree before the first round: pools filled, caches warm
# What `build_ext --inplace` leaves in a tree: the runtime's native binary, in its place.
BUILT = INIT_BINARY.relative_to(INIT_BINARY.parents[2])


@dataclass(frozen=True)
class Side:
    name: str
    latency_ms: list[float]
    cpu_us_per_run: float
    run_cpu_ms: list[float]

    def figures(self) -> dict[str, float]:
        return {"runs": len(self.latency_ms),
                "median_ms": round(median(self.latency_ms), 3),
                "p99_ms": round(percentile(self.latency_ms, 99), 3),
                "service_cpu_us_per_run": round(self.cpu_us_per_run),
                "run_cpu_ms_median": round(median(self.run_cpu_ms), 3)}


def tree(text: str) -> Path:
    path = Path(text).absolute()   # not resolved: a symlink keeps its own name
    if not (path / "service" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a sandboxd checkout (no service/cli.py)")
    if not (path / BUILT).is_file():
        raise argparse.ArgumentTypeError(
            f"{path} has no {BUILT}: build it there with `python setup.py build_ext --inplace`")
    return path


def client(url: str, image: str, policy: str) -> Callable[[], dict[str, Any]]:
    """One warm run of `true` per call, on one keep-alive connection: the run's result."""
    conn = LeanClient(url)
    request = conn.request("POST", "/v1/runs", orjson.dumps(
        {"image": image, "cmd": ["true"], "policy": policy}))

    def one() -> dict[str, Any]:
        try:
            return run_ok(conn, request)
        except LeanError as e:
            raise SystemExit(f"{url}: {e}") from None

    return one


def one_round(ones: list[Callable[[], dict[str, Any]]], pids: list[int], names: list[str],
              requests: int, burst: int) -> list[Side]:
    """One round: `requests` runs per tree, `burst` at a time to each tree in turn, the
    pair's order swapped each time."""
    procs = [psutil.Process(pid) for pid in pids]
    lat: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    before = [p.cpu_times() for p in procs]
    sizes = [burst] * (requests // burst) + ([requests % burst] if requests % burst else [])
    for i, size in enumerate(sizes):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            for _ in range(size):
                t = time.perf_counter()
                result = ones[k]()
                lat[k].append((time.perf_counter() - t) * 1000)
                cpu[k].append(float(result["cpu_ms"]))
    after = [p.cpu_times() for p in procs]
    return [Side(names[k], lat[k],
                 (after[k].user + after[k].system - before[k].user - before[k].system)
                 / len(lat[k]) * 1e6, cpu[k]) for k in (0, 1)]


def run(trees: list[Path], policy: str, requests: int, n_rounds: int, burst: int = 1
        ) -> tuple[list[Row], dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="sandboxd-bench-ab-"))
    try:
        root = busybox.build_rootfs(work / "rootfs")
        bare: Loops = measure(Command(str(root / "bin" / "busybox"), ("true",)), requests)
        with contextlib.ExitStack() as stack:
            services = [stack.enter_context(spawned(4, code=t)) for t in trees]
            ones = [client(s.url, s.image, policy) for s in services]
            for _ in range(WARMUP):
                for one in ones:
                    one()
            names = [t.name for t in trees]
            results = [one_round(ones, [s.pid for s in services], names, requests, burst)
                       for _ in range(n_rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows: list[Row] = []
    for i, (base, new) in enumerate(results, 1):
        b, n = base.figures(), new.figures()
        for key, what, bare_by in (("median_ms", "median (ms)", "p50"),
                                   ("p99_ms", "p99 (ms)", "p99"),
                                   ("service_cpu_us_per_run", "service CPU per run (µs)", None),
                                   ("run_cpu_ms_median", "the run's cpu_ms, median", None)):
            bases = loop_bases(bare, bare_by) if bare_by else ()
            rows.append(Row(f"round {i}, {base.name}: {what}", b[key], bases))
            rows.append(Row(f"round {i}, {new.name}: {what}", n[key], (("base", b[key]), *bases)))
    return rows, {"policy": policy, "requests": requests, "burst": burst,
                  "trees": [str(t) for t in trees],
                  "rounds": [{s.name: s.figures() for s in r} for r in results],
                  "bare": {m: loop.figures() for m, loop in bare.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=tree, help="the checkout to compare against")
    ap.add_argument("new", type=tree, help="the checkout with the change")
    ap.add_argument("--policy", default="judge", help="the runs' policy (default: judge)")
    ap.add_argument("--requests", type=int, default=3000, help="runs per tree and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--burst", type=int, default=1,
                    help="requests to one tree before the other's turn")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.rounds < 1 or not 1 <= args.burst <= args.requests // 2:
        ap.error("--rounds >= 1 and 1 <= --burst <= --requests / 2")
    if args.base.name == args.new.name:
        ap.error(f"both trees are named {args.base.name!r}: the rows name them by directory")
    rows, figures = run([args.base, args.new], args.policy, args.requests, args.rounds,
                          args.burst)
    if not args.json_only:
        print(table(rows))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
