"""The HTTP load test: `python -m loadtest [--spawn | --url URL] [options]`.

Drives sandboxd's POST /v1/runs with busybox workloads (true, cpu, syscalls, fork, io,
memory, judge) and a code judge with a compiler (judge-c: one request is a submission, a C
source compiled in a gcc image then run on 20 cases in the busybox image), closed loop at
--concurrency N or open loop at --rate R requests/s (latency from each request's scheduled
send time: no coordinated omission), each bounded by --requests or --duration. Beside every
workload, in the same run and loop, the same script runs as a bare local process, and
through the peers that are installed (--peers: bwrap, crun, runc, podman, each with
isolation comparable to sandboxd's); overhead = sandboxed / bare, and peer / bare.

--spawn starts its own service: a throwaway loopback registry with a busybox image and
`sandboxd serve` on a free loopback port, both removed at the end. Otherwise --url (loopback
only) and --image name a running service and a busybox image it can pull (and
--compiler-image a gcc image, for judge-c; without it `all` leaves judge-c out).

Figures and ratios only: a table on the terminal, the last line one JSON object (also
--json-out FILE), and --html FILE, a self-contained page with its plots.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

import orjson

from loadtest.http import report
from loadtest.http.peers import select as select_peers
from loadtest.http.run import Plan, run
from loadtest.http.service import (
    LoadTestError,
    add_target_args,
    check_loopback,
    spawned,
    stop_on_sigterm,
)
from loadtest.http.workloads import select
from loadtest.runtime import BenchError
from loadtest.sweep import counts as sweep_counts
from loadtest.sweep import sweep
from sandbox.errors import SandboxError

DEFAULT_REQUESTS = 200


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(ap)
    ap.add_argument("--compiler-image", help="with --url: a gcc image reference the service "
                    "can pull (gcc on PATH, static libc), for judge-c; --spawn makes its own")
    ap.add_argument("--workload", default="true",
                    help="comma-separated: true,cpu,syscalls,fork,io,memory,judge,judge-c, "
                    "or all")
    ap.add_argument("--concurrency", type=int, default=4, help="closed loop: requests at once")
    ap.add_argument("--rate", type=float, help="open loop: requests per second")
    ap.add_argument("--max-inflight", type=int, default=256,
                    help="open loop: most requests in flight (later ones wait, and their "
                    "wait counts)")
    bound = ap.add_mutually_exclusive_group()
    bound.add_argument("--requests", type=int,
                       help=f"per workload and side (default {DEFAULT_REQUESTS})")
    bound.add_argument("--duration", type=float, help="seconds per workload and side")
    ap.add_argument("--warmup", type=int, default=8, help="untimed runs before each phase")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare baseline")
    ap.add_argument("--peers", default="auto",
                    help="peers run beside bare, comma-separated: bwrap,crun,runc,podman; "
                    "auto (default: every one, those not installed reported skipped) or none")
    ap.add_argument("--sweep", type=int, metavar="ROUNDS",
                    help="then the isolation sweep (python -m loadtest.sweep) in this "
                    "process: what each layer costs, ROUNDS runs of `true` per variant")
    ap.add_argument("--json-out", type=Path, help="write the JSON report here too")
    ap.add_argument("--html", type=Path, help="write the HTML report here")
    ap.add_argument("--json-only", action="store_true",
                    help="print only the JSON line (no progress, no table)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    compiler = bool(args.spawn or args.compiler_image)
    try:
        workloads = select(args.workload, compiler=compiler)
    except ValueError as e:
        ap.error(str(e))
    left_out = [w.name for w in select(args.workload) if w not in workloads]
    if left_out:
        print(f"note: {', '.join(left_out)} left out: with --url it needs --compiler-image REF "
              "(a gcc image the service can pull)", file=sys.stderr)
    if args.concurrency < 1 or args.warmup < 0 or args.max_inflight < 1 or args.timeout <= 0:
        ap.error("--concurrency and --max-inflight need at least 1, --warmup at least 0, "
                 "--timeout above 0")
    if (args.rate is not None and args.rate <= 0) or (args.requests is not None
                                                      and args.requests < 1) \
            or (args.duration is not None and args.duration <= 0):
        ap.error("--rate, --requests and --duration must be positive")
    if args.sweep is not None and args.sweep < 2:
        ap.error("--sweep needs at least 2 rounds")
    try:
        peers = select_peers(args.peers)
    except ValueError as e:
        ap.error(str(e))
    if args.url and not args.image:
        ap.error("--url needs --image: a busybox image reference the service can pull")
    requests = args.requests if args.requests or args.duration else DEFAULT_REQUESTS
    stop_on_sigterm()

    def plan(url: str, image: str, compiler_image: str | None) -> Plan:
        return Plan(url=url, token=args.token, image=image, workloads=tuple(workloads),
                    compiler_image=compiler_image,
                    concurrency=args.concurrency, rate=args.rate, requests=requests,
                    duration_s=args.duration, warmup=args.warmup,
                    max_inflight=args.max_inflight, timeout_s=args.timeout,
                    bare=not args.no_bare, peers=peers, progress=not args.json_only)

    try:
        if args.spawn:
            if not args.json_only:
                print("... starting a registry and sandboxd serve", file=sys.stderr)
            idle = args.max_inflight if args.rate else args.concurrency
            with spawned(pool_idle=max(4, min(idle, 64)),
                         compiler=any(w.compiler for w in workloads)) as svc:
                result = asyncio.run(run(plan(svc.url, svc.image, svc.compiler_image)))
        else:
            result = asyncio.run(run(plan(check_loopback(args.url), args.image,
                                          args.compiler_image)))
        if args.sweep:
            # After the HTTP phases and with the service stopped: nothing else runs then.
            result["sweep"] = asyncio.run(sweep(sweep_counts(args.sweep), args.json_only,
                                                seed=0))
    except (LoadTestError, BenchError, SandboxError) as e:
        print(f"load test failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("load test interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    command = "python -m loadtest " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    line = orjson.dumps(result)
    if args.json_out:
        args.json_out.write_bytes(line + b"\n")
    if args.html:
        args.html.write_text(report.html(result, command))
    if not args.json_only:
        # Flushed first: the JSON line below bypasses print's buffer and must come last.
        print(report.table(result), flush=True)
    sys.stdout.buffer.write(line + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
