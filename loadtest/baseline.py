"""The bare baseline every benchmark prints beside its figures: the fastest way this machine
runs the same program with no isolation at all, measured in the same run.

Two tight loops of fork+exec+wait, no event loop, no threads, nothing else in the process:

- fork_exec: `subprocess.Popen` + `wait`, no shell. CPython forks with vfork and execs in C;
  `os.fork` + `os.execve` from Python is ~3-4x slower here (the fork copies the
  interpreter's page tables, and parent and child then fault on copy-on-write pages), so
  it would flatter every ratio;
- posix_spawn: `os.posix_spawn` + `os.waitpid`.

They run in a fresh Python process of their own session (`python -m loadtest.baseline`,
started with a new session), `concurrency` worker processes forked from it. A session of
its own is one scheduling group (an autogroup), as sandboxd's runs are in its cpu cgroup:
so CPU-bound work gets the same share of the machine on both sides, whatever else runs in
the caller's session (issue #11: without this, `cpu` came out 0.75x bare).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("fork_exec", "posix_spawn")
LABELS = {"fork_exec": "fork+exec+wait (subprocess, no shell)",
          "posix_spawn": "posix_spawn+waitpid"}
SHORT = {"fork_exec": "fork+exec", "posix_spawn": "posix_spawn"}
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))
TIMEOUT_S = 600.0


class BenchError(RuntimeError):
    """A step of a benchmark did not do what it measures (not a slow result)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    s = sorted(values)
    if not s:
        raise BenchError("no samples")
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Command:
    """What the loop runs: `path` with `argv` and `env`, stdout and stderr on /dev/null,
    stdin from `stdin[i % len(stdin)]` for run i (files), or /dev/null."""

    path: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=lambda: {"PATH": "/bin"})
    stdin: tuple[str, ...] = ()


@dataclass(frozen=True)
class Loop:
    """One loop's figures: latency per run (ms) and runs per second over all workers."""

    method: str
    concurrency: int
    runs: int
    elapsed_s: float
    latency_ms: dict[str, float]

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed_s

    @property
    def median_ms(self) -> float:
        return self.latency_ms["p50"]

    def figures(self) -> dict[str, Any]:
        return {**asdict(self), "runs_per_s": round(self.runs_per_s, 1),
                "how": LABELS[self.method]}


Loops = dict[str, Loop]


def measure(cmd: Command, runs: int, concurrency: int = 1, warmup: int = 20,
            gap_s: float = 0.0) -> Loops:
    """Both loops over `cmd`, `runs` runs in all at `concurrency` at once, after `warmup`
    untimed runs per worker; one fresh process of its own session does it. With `gap_s`,
    each worker sleeps that long before each timed run (the baseline of runs that come
    apart: an idle machine's caches and CPUs are cold then, bare too)."""
    if runs < concurrency or concurrency < 1:
        raise BenchError(f"{runs} runs cannot keep {concurrency} workers busy")
    ask = {"command": asdict(cmd), "runs": runs, "concurrency": concurrency,
           "warmup": warmup, "gap_s": gap_s}
    done = subprocess.run([sys.executable, "-m", "loadtest.baseline"],
                          input=json.dumps(ask), capture_output=True, text=True,
                          timeout=TIMEOUT_S, start_new_session=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"the bare loop of {cmd.path} {list(cmd.argv[1:])} failed: "
                            f"{done.stderr.strip()[-500:]}")
    return {m: Loop(**v) for m, v in json.loads(done.stdout).items()}


def fastest(loops: Loops, by: str = "p50") -> Loop:
    """The loop with the lowest `by` latency, or the most runs/s when `by` is "runs_per_s"."""
    if by == "runs_per_s":
        return max(loops.values(), key=lambda loop: loop.runs_per_s)
    return min(loops.values(), key=lambda loop: loop.latency_ms[by])


def ratios(value: float, loops: Loops, by: str = "p50") -> dict[str, float]:
    """value / each loop's figure `by` (a latency percentile, or runs_per_s)."""
    return {m: round(value / (loop.runs_per_s if by == "runs_per_s" else loop.latency_ms[by]), 3)
            for m, loop in loops.items()}


def flat(prefix: str, loops: Loops) -> dict[str, float]:
    """Flat JSON keys for a benchmark's last line: PREFIX_METHOD_{median,p99}_ms, ..._runs_per_s,
    and PREFIX_{median,p99}_ms / PREFIX_runs_per_s, the fastest of the two."""
    out: dict[str, float] = {}
    for m, loop in loops.items():
        out |= {f"{prefix}_{m}_median_ms": loop.latency_ms["p50"],
                f"{prefix}_{m}_p99_ms": loop.latency_ms["p99"],
                f"{prefix}_{m}_runs_per_s": round(loop.runs_per_s, 1)}
    out |= {f"{prefix}_median_ms": fastest(loops).latency_ms["p50"],
            f"{prefix}_p99_ms": fastest(loops, "p99").latency_ms["p99"],
            f"{prefix}_runs_per_s": round(fastest(loops, "runs_per_s").runs_per_s, 1)}
    return out


def describe(loops: Loops) -> str:
    """One line per loop, for a benchmark's table."""
    return "\n".join(f"  {LABELS[m]:<40} median {loop.latency_ms['p50']:.3f} ms, p99 "
                     f"{loop.latency_ms['p99']:.3f} ms, {loop.runs_per_s:.1f} runs/s "
                     f"({loop.concurrency} at once)" for m, loop in loops.items())


# --- the loops, in the fresh process -----------------------------------------------------


def _run_fork_exec(cmd: Command, i: int, null: int) -> int:
    stdin = os.open(cmd.stdin[i % len(cmd.stdin)], os.O_RDONLY) if cmd.stdin else null
    try:
        p = subprocess.Popen(cmd.argv, executable=cmd.path, env=cmd.env, stdin=stdin,
                             stdout=null, stderr=null)
        return p.wait()
    finally:
        if stdin != null:
            os.close(stdin)


def _run_posix_spawn(cmd: Command, i: int, null: int) -> int:
    stdin = ((os.POSIX_SPAWN_OPEN, 0, cmd.stdin[i % len(cmd.stdin)], os.O_RDONLY, 0)
             if cmd.stdin else (os.POSIX_SPAWN_DUP2, null, 0))
    pid = os.posix_spawn(cmd.path, list(cmd.argv), cmd.env, file_actions=[
        stdin, (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)])
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


RUNNERS = {"fork_exec": _run_fork_exec, "posix_spawn": _run_posix_spawn}


def _worker(method: str, cmd: Command, first: int, count: int, warmup: int, gap_s: float,
            ready: int, go: int, out: int) -> None:
    """A forked worker: warm up, say so, wait for the start, time `count` runs (each
    `gap_s` after the last), report."""
    run = RUNNERS[method]
    null = os.open(os.devnull, os.O_RDWR)
    for i in range(warmup):
        run(cmd, i, null)
    os.write(ready, b".")
    os.close(ready)  # so that the parent sees the end of file if another worker dies
    os.read(go, 1)  # end of file: every worker starts together
    times: list[int] = []
    failed = ""
    for i in range(first, first + count):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        code = run(cmd, i, null)
        times.append(time.perf_counter_ns() - t0)
        if code != 0:
            failed = f"{cmd.path} {list(cmd.argv[1:])} exited {code}"
            break
    end = time.monotonic_ns()
    with os.fdopen(out, "w") as f:
        json.dump({"ns": times, "end": end, "error": failed}, f)


def _loop(method: str, cmd: Command, runs: int, concurrency: int, warmup: int,
          gap_s: float) -> Loop:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    workers: list[tuple[int, int]] = []
    share, extra = divmod(runs, concurrency)
    first = 0
    for k in range(concurrency):
        count = share + (k < extra)
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # this process has no threads: forking it is safe
            code = 1
            try:
                os.close(go_w)
                os.close(out_r)
                _worker(method, cmd, first, count, warmup, gap_s, ready_w, go_r, out_w)
                code = 0
            finally:
                os._exit(code)
        os.close(out_w)
        workers.append((pid, out_r))
        first += count
    os.close(go_r)
    os.close(ready_w)
    warm = 0
    while warm < concurrency:
        got = os.read(ready_r, concurrency)
        if not got:
            for pid, _ in workers:
                os.kill(pid, signal.SIGKILL)
            raise BenchError(f"a worker of the bare loop of {cmd.path} {list(cmd.argv[1:])} "
                             "died while warming up (its error is above)")
        warm += len(got)
    os.close(ready_r)
    start = time.monotonic_ns()
    os.close(go_w)
    ns: list[int] = []
    ends: list[int] = []
    errors: list[str] = []
    for pid, out_r in workers:
        with os.fdopen(out_r) as f:
            text = f.read()
        status = os.waitpid(pid, 0)[1]
        if not text or os.waitstatus_to_exitcode(status) != 0:
            raise BenchError(f"a worker of the bare loop ended with wait status {status:#x}")
        got = json.loads(text)
        ns += got["ns"]
        ends.append(got["end"])
        if got["error"]:
            errors.append(got["error"])
    if errors:
        raise BenchError(errors[0])
    ms = [t / 1e6 for t in ns]
    lat = {k: round(percentile(ms, q), 3) for k, q in PERCENTILES}
    lat["mean"] = round(sum(ms) / len(ms), 3)
    return Loop(method, concurrency, len(ms), round((max(ends) - start) / 1e9, 4), lat)


def main() -> int:
    ask = json.load(sys.stdin)
    cmd = Command(**{**ask["command"], "argv": tuple(ask["command"]["argv"]),
                     "stdin": tuple(ask["command"]["stdin"])})
    loops = {m: _loop(m, cmd, ask["runs"], ask["concurrency"], ask["warmup"],
                      ask["gap_s"]) for m in METHODS}
    json.dump({m: asdict(loop) for m, loop in loops.items()}, sys.stdout)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
