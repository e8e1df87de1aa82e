"""Trusted timing: `python -m loadtest.timing [--runs 64] [--cpu-ms 300] [--wall-ms 5000]`.

The measurement of issue #13 point 5: N CPU-bound judge runs (an endless loop, so each
should end `time_limit` at --cpu-ms) sent at once, against its own `sandboxd serve`, in
three phases, each with a service of its own:

  idle    the same runs one at a time: the baseline (every one time_limit);
  shared  all at once without CPU slots (today: every run starts, they share the cores,
          and most reach their wall limit before their CPU limit);
  slots   all at once with [timing] cpus = every CPU: one run per CPU, the rest waiting;
  slots1  (not by default) the same with only the last CPU reserved: the service and its
          housekeeping keep the others, so the runs' CPU is theirs alone.

For each phase: the statuses, the runs' cpu_ms, wall_ms and host_load (median and max),
how many had a CPU of their own, and the whole phase's time. Then `repeat`: a fixed loop of
about --loop-ms of CPU made --repeats times in one request on a slot; its cpu_ms spread
(the issue's goal: at most 1 % over 50 repeats).

Figures only; the last line is one JSON object (also --json-out FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.http.service import LoadTestError, spawned, stop_on_sigterm
from sandbox.runtime.profiles import format_cpuset, host_cpus

BUSY = "while :; do :; done"
# Iterations of busybox sh's arithmetic loop per ms of CPU, roughly; only sizes the loop.
LOOP_PER_MS = 600


def _body(image: str, script: str, limits: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"image": image, "cmd": ["sh", "-c", script], "env": {"PATH": "/bin"},
            "policy": "judge", "limits": limits, **extra}


async def _post(s: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with s.post("/v1/runs", json=body) as r:
        result: dict[str, Any] = await r.json()
        if r.status != 200:
            raise LoadTestError(f"POST /v1/runs answered {r.status}: {result}")
        return result


def _figures(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    def spread(key: str) -> dict[str, float | None]:
        values = [r[key] for r in results if r.get(key) is not None]
        if not values:
            return {"median": None, "max": None}
        return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}

    loads = [r["host_load"] for r in results if r.get("host_load") is not None]
    return {"runs": len(results),
            "statuses": dict(Counter(r["status"] for r in results).most_common()),
            "cpu_ms": spread("cpu_ms"), "wall_ms": spread("wall_ms"),
            "host_load": {"median": round(statistics.median(loads), 3) if loads else None,
                          "max": round(max(loads), 3) if loads else None},
            "dedicated_cpu": sum(1 for r in results if r.get("dedicated_cpu")),
            "cpus": dict(Counter(r.get("cpus") for r in results).most_common()),
            "phase_s": round(seconds, 2)}


async def _phase(url: str, body: dict[str, Any], runs: int, at_once: bool) -> dict[str, Any]:
    limit = aiohttp.TCPConnector(limit=runs + 4)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(url, connector=limit, timeout=timeout) as s:
        for _ in range(2):  # the image pulled and a warm container: runs below are alike
            await _post(s, {**body, "cmd": ["true"]})
        t0 = time.monotonic()
        if at_once:
            results = list(await asyncio.gather(*(_post(s, body) for _ in range(runs))))
        else:
            results = [await _post(s, body) for _ in range(runs)]
        return _figures(results, time.monotonic() - t0)


async def _repeat(url: str, image: str, loop_ms: int, repeats: int) -> dict[str, Any]:
    n = loop_ms * LOOP_PER_MS
    body = _body(image, f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); done",
                 {"cpu_ms": 20 * loop_ms + 1000, "wall_ms": 40 * loop_ms + 2000},
                 repeat=repeats)
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=None)) as s:
        await _post(s, {**body, "cmd": ["true"], "repeat": 1})
        r = await _post(s, body)
    rep = r["repeats"]
    return {"n": rep["n"], "statuses": rep["statuses"], "cpu_ms": rep["cpu_ms"],
            "wall_ms": rep["wall_ms"], "cpus": r["cpus"], "dedicated_cpu": r["dedicated_cpu"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.timing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=64, help="runs sent at once (default 64)")
    ap.add_argument("--idle-runs", type=int, default=8,
                    help="runs of the one-at-a-time baseline (default 8)")
    ap.add_argument("--cpu-ms", type=int, default=300)
    ap.add_argument("--wall-ms", type=int, default=5000)
    ap.add_argument("--loop-ms", type=int, default=1000,
                    help="CPU of the repeated loop, roughly (default 1000)")
    ap.add_argument("--repeats", type=int, default=50, help="0: no repeat phase")
    ap.add_argument("--phases", default="idle,shared,slots,repeat")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    stop_on_sigterm()
    phases = args.phases.split(",")
    limits = {"cpu_ms": args.cpu_ms, "wall_ms": args.wall_ms}
    cpus = {"slots": format_cpuset(host_cpus()), "slots1": str(max(host_cpus()))}
    out: dict[str, Any] = {"cores": len(host_cpus()), "runs": args.runs, "limits": limits}
    try:
        for phase in phases:
            config = "" if phase == "shared" else (
                f'[timing]\ncpus = "{cpus.get(phase, cpus["slots"])}"\n'
                f"max_repeat = {max(args.repeats, 1)}\n")
            with spawned(pool_idle=args.runs if phase == "shared" else 4,
                         config=config) as svc:
                body = _body(svc.image, BUSY, limits)
                if phase == "idle":
                    out[phase] = asyncio.run(_phase(svc.url, body, args.idle_runs, False))
                elif phase in ("shared", "slots", "slots1"):
                    out[phase] = asyncio.run(_phase(svc.url, body, args.runs, True))
                elif phase == "repeat" and args.repeats:
                    out[phase] = asyncio.run(_repeat(svc.url, svc.image, args.loop_ms,
                                                     args.repeats))
                else:
                    raise LoadTestError(f"--phases: unknown phase {phase!r}; known: idle, "
                                        "shared, slots, slots1, repeat")
            print(f"{phase:>7}: {orjson.dumps(out[phase]).decode()}", file=sys.stderr)
    except LoadTestError as e:
        print(f"loadtest.timing: {e}", file=sys.stderr)
        return 2
    line = orjson.dumps(out).decode()
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
