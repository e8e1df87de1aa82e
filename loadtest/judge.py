"""The judge benchmark: `python -m loadtest.judge [--cases N] [--lines N] [--repeats N]
[--submissions N] [--quick]`.

It starts its own loopback registry (busybox and gcc 12 images) and `sandboxd serve` (as
`python -m loadtest --spawn --workload judge-c` does), with the judge's CPUs reserved
(`[timing] cpus`), and measures the four figures of issue #13, each beside the fastest
honest bare equivalent of the same run:

- submission: a C solution compiled once (POST /v1/runs in the gcc image, the binary kept
  by `copy_out_cached`), then its 20 cases as one batch (POST /v1/batches, the binary bound
  from the file cache); bare: the host's gcc, then the 20 cases posix_spawned one after
  another (loadtest's judge-c workload, both sides);
- a batch of `--cases` cases of a compiled program that reads a line and prints it, from the
  cached binary: cases per second and each case's time in the service (from the moment it
  is taken up to its result: `elapsed_ms` of its event); bare: the same binary, the same
  stdin, in loadtest.baseline's tight loops at the batch's parallelism;
- an interactor exchanging `--lines` lines with a solution, as one pipeline (POST /v1/runs
  with `processes` and `pipes`); bare: the same two binaries on the host joined by two
  pipes, timed from spawn to the last exit, free to run on any CPU and both pinned to one
  (the pipeline's processes share the CPU slot of its policy: a ping-pong on one CPU
  wakes no other, which is much faster here than one across two);
- the CPU time of a ~1 s loop, `repeat: --repeats` on a reserved CPU: its spread
  ((max - min) / median, the worst pair) and its coefficient of variation (standard
  deviation / mean); bare: the same loop run as many times on the host, pinned to the CPU
  the sandboxed repeats had, its CPU time from wait4's rusage (microseconds), the same two
  figures.

Figures and ratios as a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import BenchError, Command, fastest, measure, percentile
from loadtest.http.service import spawned, stop_on_sigterm
from loadtest.http.workloads import JUDGE_C_SOLUTION, judge_answer, judge_compile, judge_input
from loadtest.rows import Row, loop_bases, table

SUBMISSION_CASES = 20
ECHO_C = """#include <stdio.h>
int main(void) {
    char line[4096];
    while (fgets(line, sizeof line, stdin))
        fputs(line, stdout);
    return 0;
}
"""
# Writes 0..n-1, one per line, and expects each back before the next.
INTERACTOR_C = """#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10000;
    char line[64];
    for (long i = 0; i < n; i++) {
        printf("%ld\\n", i);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin) || atol(line) != i)
            return 1;
    }
    return 0;
}
"""
SOLUTION_C = """#include <stdio.h>
int main(void) {
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        fputs(line, stdout);
        fflush(stdout);
    }
    return 0;
}
"""
SPIN_C = (Path(__file__).parent / "workloads" / "spin.c").read_text()
SPIN_ITERATIONS = "450000000"   # ~1 s of one core here
PROGRAMS = {"solution": JUDGE_C_SOLUTION, "echo": ECHO_C, "interactor": INTERACTOR_C,
            "pingpong": SOLUTION_C, "spin": SPIN_C}
LIMITS = {"cpu_ms": 10_000, "wall_ms": 30_000, "memory_bytes": 256 << 20}
HOST_PATH = "/usr/bin:/bin"


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


async def _post(s: aiohttp.ClientSession, path: str, body: dict[str, Any],
                expect: int = 200) -> Any:
    async with s.post(path, json=body) as r:
        if r.status != expect:
            raise BenchError(f"POST {path}: {r.status} {(await r.text())[:500]}")
        return await r.json()


async def _batch(s: aiohttp.ClientSession, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch's events, in the order they came."""
    events = []
    async with s.post("/v1/batches", json=body) as r:
        if r.status != 200:
            raise BenchError(f"POST /v1/batches: {r.status} {(await r.text())[:500]}")
        async for line in r.content:
            if line.strip():
                events.append(json.loads(line))
    if not events or events[-1].get("event") != "summary":
        raise BenchError(f"the batch did not end with its summary: {events[-1:]}")
    return events


def _cases_ok(events: list[dict[str, Any]], expect: list[str]) -> list[dict[str, Any]]:
    cases = [e for e in events if e.get("event") == "case"]
    for e in cases:
        result = e.get("result") or {}
        if result.get("status") != "ok" or result.get("stdout") != expect[e["index"]]:
            raise BenchError(f"case {e['index']}: {json.dumps(e)[:400]}")
    if len(cases) != len(expect):
        raise BenchError(f"{len(cases)} case events for {len(expect)} cases")
    return cases


class Judge:
    """The programs compiled once in the service (kept in the file cache) and on the host."""

    def __init__(self, s: aiohttp.ClientSession, image: str, gcc_image: str,
                 scratch: Path) -> None:
        self.s, self.image, self.gcc_image, self.scratch = s, image, gcc_image, scratch
        self.ids: dict[str, str] = {}
        self.host: dict[str, str] = {}

    async def compile(self, name: str) -> float:
        """`name` compiled in the gcc image, its binary kept by id; the request's time."""
        t0 = time.perf_counter()
        out = await _post(self.s, "/v1/runs", {
            "image": self.gcc_image, "policy": "judge",
            "cmd": judge_compile("/tmp/p.c", "/tmp/p"),
            "env": {"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"},
            "files": [{"path": "/tmp/p.c", "content": PROGRAMS[name]}],
            "copy_out_cached": ["/tmp/p"], "limits": LIMITS})
        took = _ms(t0)
        if out["status"] != "ok" or "/tmp/p" not in out.get("file_ids", {}):
            raise BenchError(f"compiling {name} failed: {json.dumps(out)[:600]}")
        self.ids[name] = out["file_ids"]["/tmp/p"]["id"]
        return took

    def compile_host(self, name: str) -> float:
        gcc = shutil.which("gcc", path=HOST_PATH)
        if gcc is None:
            raise BenchError("the bare side compiles with the host's gcc: apt-get install gcc "
                             "libc6-dev")
        src = self.scratch / f"{name}.c"
        src.write_text(PROGRAMS[name])
        binary = self.scratch / name
        t0 = time.perf_counter()
        subprocess.run(judge_compile(str(src), str(binary)), check=True, env={
            "PATH": HOST_PATH, "TMPDIR": str(self.scratch)})
        self.host[name] = str(binary)
        return _ms(t0)

    def files(self, name: str, path: str = "/tmp/p") -> list[dict[str, Any]]:
        return [{"path": path, "file_id": self.ids[name], "mode": 0o755}]


async def submissions(j: Judge, n: int) -> tuple[list[float], list[float]]:
    """`n` whole submissions (compile, then the 20 cases as a batch), sandboxed and bare:
    each one's time in ms."""
    inputs = [judge_input(c) for c in range(SUBMISSION_CASES)]
    answers = [judge_answer(c) for c in range(SUBMISSION_CASES)]
    sandboxed, bare = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        await j.compile("solution")
        events = await _batch(j.s, {
            "image": j.image, "policy": "judge", "cmd": ["/tmp/p"], "env": {"PATH": "/bin"},
            "files": j.files("solution"), "limits": LIMITS, "stop_on_failure": True,
            "cases": [{"stdin": text} for text in inputs]})
        _cases_ok(events, answers)
        sandboxed.append(_ms(t0))
        t0 = time.perf_counter()
        j.compile_host("solution")
        for text, want in zip(inputs, answers, strict=True):
            done = subprocess.run([j.host["solution"]], input=text.encode(),
                                  capture_output=True, check=False)
            if done.returncode != 0 or done.stdout.decode() != want:
                raise BenchError(f"bare case failed: {done}")
        bare.append(_ms(t0))
    return sandboxed, bare


async def batch(j: Judge, cases: int) -> tuple[float, dict[str, float], int]:
    """A batch of `cases` echo cases from the cached binary: cases/s, percentiles of each
    case's time in the service, and the parallelism the service used."""
    lines = [f"case {i}\n" for i in range(cases)]
    t0 = time.perf_counter()
    events = await _batch(j.s, {
        "image": j.image, "policy": "judge", "cmd": ["/tmp/p"], "env": {"PATH": "/bin"},
        "files": j.files("echo"), "limits": LIMITS,
        "cases": [{"stdin": line} for line in lines]})
    elapsed = time.perf_counter() - t0
    done = _cases_ok(events, lines)
    took = [float(e["elapsed_ms"]) for e in done]
    summary = events[-1]
    return (cases / elapsed, {q: percentile(took, v) for q, v in (("p50", 50), ("p99", 99))},
            int(summary.get("parallelism", 0)))


async def pipeline(j: Judge, lines: int) -> float:
    t0 = time.perf_counter()
    out = await _post(j.s, "/v1/runs", {
        "image": j.image, "policy": "judge", "env": {"PATH": "/bin"}, "limits": LIMITS,
        "processes": [
            {"cmd": ["/tmp/i", str(lines)], "files": j.files("interactor", "/tmp/i")},
            {"cmd": ["/tmp/s"], "files": j.files("pingpong", "/tmp/s")}],
        "pipes": [{"from": [0, 1], "to": [1, 0]}, {"from": [1, 1], "to": [0, 0]}]})
    took = _ms(t0)
    if [p["status"] for p in out["processes"]] != ["ok", "ok"]:
        raise BenchError(f"the pipeline failed: {json.dumps(out)[:800]}")
    return took


def _pinned(cpu: int | None) -> Any:
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


def pipeline_host(j: Judge, lines: int, cpu: int | None = None) -> float:
    """The same two programs on the host, joined by two pipes; on CPU `cpu` only, if given."""
    a_r, a_w = os.pipe()   # interactor -> solution
    b_r, b_w = os.pipe()   # solution -> interactor
    t0 = time.perf_counter()
    inter = subprocess.Popen([j.host["interactor"], str(lines)], stdin=b_r, stdout=a_w,
                             preexec_fn=_pinned(cpu))
    sol = subprocess.Popen([j.host["pingpong"]], stdin=a_r, stdout=b_w,
                           preexec_fn=_pinned(cpu))
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)
    codes = (inter.wait(), sol.wait())
    took = _ms(t0)
    if codes != (0, 0):
        raise BenchError(f"the bare pair failed: exit codes {codes}")
    return took


async def repeats(j: Judge, n: int) -> dict[str, Any]:
    out = await _post(j.s, "/v1/runs", {
        "image": j.image, "policy": "judge", "cmd": ["/tmp/p", SPIN_ITERATIONS],
        "env": {"PATH": "/bin"}, "files": j.files("spin"), "limits": LIMITS, "repeat": n})
    if out["status"] != "ok":
        raise BenchError(f"the spin loop failed: {json.dumps(out)[:600]}")
    return dict(out["repeats"]["cpu_ms"]) | {"dedicated_cpu": out.get("dedicated_cpu"),
                                             "cpus": out.get("cpus")}


def repeats_host(j: Judge, n: int, cpu_of_runs: str | None) -> dict[str, float]:
    """The loop `n` times on the CPU the sandboxed repeats had (`cpus` of their result; else
    the last), each one's CPU time from wait4 (microseconds): vCPUs of one VM differ."""
    on = int(cpu_of_runs) if cpu_of_runs and cpu_of_runs.isdigit() else max(
        os.sched_getaffinity(0))
    cpu = []
    for _ in range(n):
        with open(os.devnull, "wb") as null:
            p = subprocess.Popen([j.host["spin"], SPIN_ITERATIONS], stdout=null,
                                 preexec_fn=_pinned(on))
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise BenchError(f"the bare loop exited {p.returncode}")
        cpu.append((usage.ru_utime + usage.ru_stime) * 1000)
    med, mean = statistics.median(cpu), statistics.fmean(cpu)
    return {"min": min(cpu), "median": med, "max": max(cpu),
            "spread": (max(cpu) - min(cpu)) / med, "cv": statistics.stdev(cpu) / mean}


def run(n_sub: int, cases: int, lines: int, n_rep: int) -> tuple[list[Row], dict[str, Any]]:
    scratch = Path(tempfile.mkdtemp(prefix="sandboxd-judge-bench-"))
    try:
        with spawned(8, min_idle=2, compiler=True,
                     config='[timing]\ncpus = "0-1"\n') as svc:
            assert svc.compiler_image is not None
            return asyncio.run(_measure(svc.url, svc.image, svc.compiler_image, scratch,
                                        n_sub, cases, lines, n_rep))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _measure(url: str, image: str, gcc_image: str, scratch: Path, n_sub: int,
                   cases: int, lines: int, n_rep: int) -> tuple[list[Row], dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(url, timeout=timeout) as s:
        j = Judge(s, image, gcc_image, scratch)
        for name in PROGRAMS:   # the first compile pulls the gcc image
            await j.compile(name)
            j.compile_host(name)
        await submissions(j, 1)   # warm-up
        sub, sub_bare = await submissions(j, n_sub)
        await batch(j, min(cases, 50))   # warm the pool
        per_s, case_ms, parallelism = await batch(j, cases)
        echo = Command(j.host["echo"], (j.host["echo"],), {},
                       tuple(_stdin_files(scratch, min(cases, 100))))
        loops = await asyncio.to_thread(measure, echo, cases, max(1, parallelism))
        await pipeline(j, min(lines, 100))
        pipe_ms = statistics.median([await pipeline(j, lines) for _ in range(3)])
        pipe_free = statistics.median([pipeline_host(j, lines) for _ in range(3)])
        pinned_cpu = max(os.sched_getaffinity(0))
        pipe_pinned = statistics.median([pipeline_host(j, lines, pinned_cpu)
                                         for _ in range(3)])
        pipe_bare = min(pipe_free, pipe_pinned)
        rep = await repeats(j, n_rep)
        rep_bare = await asyncio.to_thread(repeats_host, j, n_rep, rep.get("cpus"))
    sub_med, bare_med = statistics.median(sub), statistics.median(sub_bare)
    best = fastest(loops, "runs_per_s")
    rows = [
        Row(f"submission: compile + {SUBMISSION_CASES} cases (median ms)", sub_med,
            (("bare gcc + spawns", bare_med),)),
        Row(f"batch of {cases} echo cases: cases/s (parallelism {parallelism})", per_s,
            loop_bases(loops, "runs_per_s", " runs/s")),
        Row("batch: a case's time in the service, p50 ms", case_ms["p50"],
            loop_bases(loops, "p50")),
        Row("batch: a case's time in the service, p99 ms", case_ms["p99"],
            loop_bases(loops, "p99")),
        Row(f"interactor <-> solution, {lines} lines (median ms)", pipe_ms,
            (("bare pipes, one CPU", pipe_pinned), ("bare pipes, any CPU", pipe_free))),
        Row(f"spin ~1 s, {n_rep} repeats: CPU time (max - min) / median %",
            rep["spread"] * 100, (("bare, one CPU", rep_bare["spread"] * 100),)),
        Row(f"spin ~1 s, {n_rep} repeats: CPU time stdev / mean %", rep["cv"] * 100,
            (("bare, one CPU", rep_bare["cv"] * 100),)),
    ]
    fig = {"submission_median_ms": round(sub_med, 2), "submission_bare_median_ms":
           round(bare_med, 2), "submission_ratio": round(sub_med / bare_med, 3),
           "batch_cases": cases, "batch_parallelism": parallelism,
           "batch_cases_per_s": round(per_s, 1),
           "batch_bare_runs_per_s": round(best.runs_per_s, 1),
           "batch_case_p50_ms": round(case_ms["p50"], 3),
           "batch_case_p99_ms": round(case_ms["p99"], 3),
           "pipeline_lines": lines, "pipeline_median_ms": round(pipe_ms, 2),
           "pipeline_bare_median_ms": round(pipe_bare, 2),
           "pipeline_bare_one_cpu_median_ms": round(pipe_pinned, 2),
           "pipeline_bare_any_cpu_median_ms": round(pipe_free, 2),
           "pipeline_ratio": round(pipe_ms / pipe_bare, 3),
           "repeat_n": n_rep, "repeat_cpu_ms": rep, "repeat_bare_cpu_ms": rep_bare}
    return rows, fig


def _stdin_files(scratch: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = scratch / f"stdin.{i}"
        p.write_text(f"case {i}\n")
        paths.append(str(p))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.judge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--submissions", type=int, default=5, help="timed submissions (median)")
    ap.add_argument("--cases", type=int, default=1000, help="cases in the batch")
    ap.add_argument("--lines", type=int, default=10_000, help="interactor exchanges")
    ap.add_argument("--repeats", type=int, default=50, help="repeats of the ~1 s loop")
    ap.add_argument("--quick", action="store_true", help="small counts, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.quick:
        args.submissions, args.cases, args.lines, args.repeats = 1, 40, 200, 3
    if min(args.submissions, args.cases, args.lines, args.repeats) < 1:
        ap.error("every count must be at least 1")
    try:
        rows, fig = run(args.submissions, args.cases, args.lines, args.repeats)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print("sandboxd judge benchmark (issue #13 goals)")
        print(table(rows))
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
