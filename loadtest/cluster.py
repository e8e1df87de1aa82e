"""The cluster goals (issue #14): `python -m loadtest.cluster [--runs 40] [--pairs 400]`.

Two `sandboxd serve` nodes on this machine, each confined to one CPU: the node's processes
by `taskset -c N` and its runs by its cpuset (`[timing] cpus = "N"` reserves the CPU for
its judge runs, one run at a time, enforced by the run cgroup's cpuset). Two HAProxy
(testbed/haproxy.py) in front: one over node A alone, one over A and B. In the same run:

- scaling: `--runs` CPU-bound runs (a busybox shell loop of `--loop` iterations, judge
  policy) at concurrency 4 through each balancer, alternating `--rounds` times; runs/s of
  two nodes over one (goal >= 1.7x). Beside it the bare loop (loadtest.baseline) of the
  same command at concurrency 1 and 2: what one and two CPUs do with no isolation at all;
- the balancer's cost: `--pairs` warm runs of busybox `true`, one at a time, alternating
  direct to node A and through the one-node HAProxy (keep-alive both ways); the difference
  of the medians (goal <= 0.3 ms), beside the bare fork+exec of `true`.

The load runs in this process (asyncio, aiohttp) on the same two CPUs: measure on a quiet
machine and say what else ran. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import BenchError, Command, fastest, measure
from loadtest.http.service import stop_on_sigterm
from loadtest.output import emit
from loadtest.rows import Row, loop_bases, table
from sandbox.runtime.profiles import host_cpus
from testbed import busybox
from testbed.demoimages import write_tar
from testbed.haproxy import SERVED_BY, Backend, HAProxy, start_haproxy
from testbed.nodes import Node

TOKEN = "loadtest-cluster-token-0123456789"
IMAGE = "loadtest/busybox:1"
CONCURRENCY = 4
GOAL_SCALING = 1.7
GOAL_COST_MS = 0.3
REQUEST_TIMEOUT_S = 300
# A run starved by whatever else the machine does must end slow, not killed as too slow.
LIMITS = {"wall_ms": 60000}


def node_config(cpu: int) -> str:
    return f"""
[[tokens]]
token = "{TOKEN}"
name = "loadtest"

[pools]
min_idle = 2
max_idle = 4

[timing]
cpus = "{cpu}"
policies = ["judge"]
"""


def spin(loop: int) -> list[str]:
    return ["sh", "-c", f"i=0; while [ $i -lt {loop} ]; do i=$((i+1)); done; echo $i"]


@dataclass
class Lab:
    nodes: list[Node]
    one: HAProxy  # node A alone
    two: HAProxy  # nodes A and B


@contextmanager
def lab(work: Path) -> Iterator[Lab]:
    cpus = sorted(host_cpus())
    if len(cpus) < 2:
        raise BenchError(f"two CPUs are needed (one per node); this process may use {cpus}")
    tar = write_tar(busybox.build_rootfs(work / "rootfs"), work / "busybox.tar.gz")
    with ExitStack() as stack:
        nodes = []
        for name, cpu in (("a", cpus[0]), ("b", cpus[1])):
            node = Node(name, "127.0.0.1", 0, work / name, node_config(cpu),
                        ("taskset", "-c", str(cpu)))
            stack.callback(node.stop)
            node.start()
            asyncio.run(import_image(node.url, tar))
            nodes.append(node)
        backends = [Backend(n.name, n.address, n.port) for n in nodes]
        one = stack.enter_context(start_haproxy(work / "haproxy-one", backends[:1]))
        two = stack.enter_context(start_haproxy(work / "haproxy-two", backends))
        one.wait_for({"a": "UP"})
        two.wait_for({"a": "UP", "b": "UP"})
        yield Lab(nodes, one, two)


def session(url: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                                 connector=aiohttp.TCPConnector(limit=0))


async def import_image(url: str, tar: Path) -> None:
    async with session(url) as s, s.post("/v1/images/import", params={"reference": IMAGE},
                                         data=tar.read_bytes()) as r:
        if r.status != 201:
            raise BenchError(f"importing the image into {url} failed: {await r.text()}")


async def one_run(s: aiohttp.ClientSession, cmd: list[str], policy: str) -> str | None:
    """A run that must succeed; returns the node that served it (HAProxy's header)."""
    async with s.post("/v1/runs", json={"image": IMAGE, "cmd": cmd, "env": {"PATH": "/bin"},
                                        "policy": policy, "limits": LIMITS}) as r:
        body = await r.json(content_type=None)
        if r.status != 200 or body.get("status") != "ok":
            raise BenchError(f"a run failed: {r.status} {str(body)[:500]}")
        return r.headers.get(SERVED_BY)


async def throughput(url: str, cmd: list[str], runs: int) -> tuple[float, dict[str, int]]:
    """runs/s of `runs` judge runs at CONCURRENCY, and how many each node served."""
    served: dict[str, int] = {}
    queue = iter(range(runs))

    async def worker(s: aiohttp.ClientSession) -> None:
        for _ in queue:
            node = await one_run(s, cmd, "judge")
            served[node or "?"] = served.get(node or "?", 0) + 1
    async with session(url) as s:
        await one_run(s, cmd, "judge")  # warm both connections and pools
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(CONCURRENCY)))
        return runs / (time.perf_counter() - start), served


async def warm_pairs(direct: str, balanced: str, pairs: int) -> tuple[list[float], list[float]]:
    """Latency (ms) of warm `true` runs, alternating direct and through the balancer."""
    out: tuple[list[float], list[float]] = ([], [])
    async with session(direct) as d, session(balanced) as b:
        for _ in range(20):  # warm-up: pools filled, connections open
            await one_run(d, ["true"], "default")
            await one_run(b, ["true"], "default")
        for i in range(pairs):
            order = ((0, d), (1, b)) if i % 2 == 0 else ((1, b), (0, d))
            for which, s in order:
                t = time.perf_counter()
                await one_run(s, ["true"], "default")
                out[which].append((time.perf_counter() - t) * 1000)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    cmd = spin(args.loop)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="sandboxd-loadtest-cluster-"))
    try:
        with lab(work) as cluster:
            one, two = [], []
            spread: dict[str, int] = {}
            for _ in range(args.rounds):
                one.append(asyncio.run(throughput(cluster.one.url, cmd, args.runs))[0])
                rate, served = asyncio.run(throughput(cluster.two.url, cmd, args.runs))
                two.append(rate)
                spread = {k: spread.get(k, 0) + v for k, v in served.items()}
            direct, balanced = asyncio.run(warm_pairs(cluster.nodes[0].url, cluster.one.url,
                                                      args.pairs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bb = str(busybox.find_busybox())
    bare_spin = {c: measure(Command(bb, ("busybox", *cmd)), max(c, args.runs // 4), c, warmup=1)
                 for c in (1, 2)}
    bare_true = measure(Command(bb, ("busybox", "true")), args.pairs, 1)
    one_rate, two_rate = statistics.median(one), statistics.median(two)
    d_med, b_med = statistics.median(direct), statistics.median(balanced)
    rows = [
        Row("one node behind HAProxy: spin runs/s", one_rate,
            loop_bases(bare_spin[1], "runs_per_s", " c1")),
        Row("two nodes behind HAProxy: spin runs/s", two_rate,
            loop_bases(bare_spin[2], "runs_per_s", " c2")),
        Row(f"two / one (goal >= {GOAL_SCALING})", two_rate / one_rate),
        Row("warm `true` direct: median ms", d_med, loop_bases(bare_true, "p50")),
        Row("warm `true` through HAProxy: median ms", b_med, loop_bases(bare_true, "p50")),
        Row(f"balancer's cost: median difference ms (goal <= {GOAL_COST_MS})", b_med - d_med),
    ]
    if not args.json_only:
        print(table(rows))
    return {
        "one_node_runs_per_s": round(one_rate, 2), "two_nodes_runs_per_s": round(two_rate, 2),
        "scaling": round(two_rate / one_rate, 3), "scaling_goal_met": two_rate / one_rate
        >= GOAL_SCALING, "two_nodes_served": spread,
        "bare_spin_c1_runs_per_s": round(fastest(bare_spin[1], "runs_per_s").runs_per_s, 2),
        "bare_spin_c2_runs_per_s": round(fastest(bare_spin[2], "runs_per_s").runs_per_s, 2),
        "direct_median_ms": round(d_med, 3), "haproxy_median_ms": round(b_med, 3),
        "direct_p90_ms": round(statistics.quantiles(direct, n=10)[-1], 3),
        "haproxy_p90_ms": round(statistics.quantiles(balanced, n=10)[-1], 3),
        "balancer_cost_ms": round(b_med - d_med, 3),
        "balancer_goal_met": b_med - d_med <= GOAL_COST_MS,
        "bare_true_median_ms": round(fastest(bare_true).latency_ms["p50"], 3),
        "runs": args.runs, "rounds": args.rounds, "loop": args.loop, "pairs": args.pairs,
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="spin runs per phase (default 40)")
    ap.add_argument("--rounds", type=int, default=2, help="one/two phases, alternated")
    ap.add_argument("--loop", type=int, default=200000,
                    help="shell loop iterations of a spin run (~0.2 s at the default)")
    ap.add_argument("--pairs", type=int, default=400, help="warm direct/balanced run pairs")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.quick:
        args.runs, args.rounds, args.loop, args.pairs = 8, 1, 20000, 20
    if min(args.runs, args.rounds, args.loop, args.pairs) < 1:
        ap.error("every count must be at least 1")
    emit(run(args), args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
