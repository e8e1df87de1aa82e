"""The code judge with a compiler (workload judge-c): one request is one submission, run the
way go-judge or Judge0 clients run theirs.

Sandboxed: one run of the compiler image (POST /v1/runs) compiles the C source (its
`files`) and keeps the binary in the file cache (`copy_out_cached`); then every case is one
batch (POST /v1/batches) of the binary (a `files` entry by `file_id`, mode 0755) in the
busybox image, each case with its stdin, every output checked. The first failure ends the
submission (`stop_on_failure`): compile_error, wrong_answer, or the failing case's status.

Bare: the host's gcc with the same command, then the cases posix_spawned one after another.

The submission's latency is the request's; compile and per-case times are kept beside it
(`times`), cleared after the warm-up so that they cover the measured phase only.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from loadtest.http.service import LoadTestError
from loadtest.http.stats import Outcome, new_histogram, percentiles_ms
from loadtest.http.targets import (
    BareEnv,
    HttpTarget,
    Invocation,
    SpawnTarget,
    answer,
    clip,
    run_outcome,
    write_files,
)
from loadtest.http.workloads import JUDGE_BINARY, JUDGE_CASES, Workload, judge_compile

# gcc finds as and ld on PATH; the compiler image has them in /usr/bin.
COMPILER_ENV = {"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"}
HOST_PATH = "/usr/bin:/bin"


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1e6))


@dataclass
class SubmissionTimes:
    """Compile and per-case times of the submissions that got that far (client side:
    request to answer sandboxed, spawn to exit bare)."""

    compile: HdrHistogram = field(default_factory=new_histogram)
    case: HdrHistogram = field(default_factory=new_histogram)

    def add(self, compile_s: float | None, cases_s: list[float]) -> None:
        if compile_s is not None:
            self.compile.record_value(_us(compile_s))
        for s in cases_s:
            self.case.record_value(_us(s))

    def clear(self) -> None:
        self.compile.reset()
        self.case.reset()

    def summary(self) -> dict[str, Any]:
        return {"cases_per_submission": JUDGE_CASES, "compile_ms": percentiles_ms(self.compile),
                "case_ms": percentiles_ms(self.case)}


def _compile_failure(outcome: Outcome) -> Outcome:
    status = "compile_error" if outcome.status == "nonzero_exit" else outcome.status
    return Outcome(False, outcome.http, status, outcome.error)


class JudgeHttpTarget(HttpTarget):
    """Submissions to the service: compile in a session of `compiler_image`, run the cases
    in `image` (busybox)."""

    def __init__(self, url: str, token: str | None, image: str, compiler_image: str,
                 workload: Workload, connections: int, timeout_s: float) -> None:
        super().__init__(url, token, image, workload, connections, timeout_s)
        self.base = url.rstrip("/")
        self.compiler_image = compiler_image
        self.times = SubmissionTimes()

    async def _json(self, method: str, path: str, body: dict[str, Any],
                    expected: int = 200) -> dict[str, Any] | Outcome:
        async with self.session.request(method, self.base + path,
                                        data=orjson.dumps(body)) as resp:
            return answer(resp.status, await resp.read(), expected)

    async def send(self, seq: int) -> Outcome:
        built = await self._compile(seq)
        if isinstance(built, Outcome):
            return built
        file_id, compile_s = built
        outcome, cases_s = await self._cases(file_id, seq)
        self.times.add(compile_s, cases_s)
        return outcome

    async def _compile(self, seq: int) -> tuple[str, float] | Outcome:
        """The binary compiled by one run of the compiler image and kept in the file cache
        (`copy_out_cached`): its id, and the compile request's time."""
        source = [{"path": p, "content": c, "mode": m} for p, c, m in self.workload.files]
        start = time.monotonic()
        done = await self._json("POST", "/v1/runs", {
            "image": self.compiler_image, "policy": self.workload.policy,
            "cmd": judge_compile(source[0]["path"], JUDGE_BINARY), "env": COMPILER_ENV,
            "files": source, "limits": self.workload.limits,
            "copy_out_cached": [JUDGE_BINARY]})
        compile_s = time.monotonic() - start
        if isinstance(done, Outcome):
            return done
        compiled = run_outcome(done, lambda _: True, f"request {seq}: gcc")
        if not compiled.ok:
            return _compile_failure(compiled)
        kept = done.get("file_ids", {}).get(JUDGE_BINARY)
        if kept is None:
            return Outcome(False, "200", "internal_error", f"request {seq}: the binary was "
                           f"not kept: {done.get('file_errors')}")
        return str(kept["id"]), compile_s

    async def _cases(self, file_id: str, seq: int) -> tuple[Outcome, list[float]]:
        """Every case as one batch (POST /v1/batches, stopping at the first failure), the
        binary bound from the file cache; each case's time in the service."""
        w = self.workload
        assert w.stdin is not None and w.expect is not None
        body = {"image": self.image, "cmd": [JUDGE_BINARY], "policy": w.policy,
                "env": {"PATH": "/bin"}, "limits": w.limits, "stop_on_failure": True,
                "files": [{"path": JUDGE_BINARY, "file_id": file_id, "mode": 0o755}],
                "cases": [{"stdin": w.stdin(case)} for case in range(JUDGE_CASES)]}
        times: list[float] = []
        failures: dict[int, Outcome] = {}   # the first by case number is the verdict
        async with self.session.post(self.base + "/v1/batches",
                                     data=orjson.dumps(body)) as resp:
            if resp.status != 200:
                failed = answer(resp.status, await resp.read(), 200)
                assert isinstance(failed, Outcome)
                return failed, times
            async for line in resp.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                if event.get("event") != "case":
                    continue
                case = int(event["index"])
                if "error" in event:
                    failures[case] = Outcome(False, "200",
                                             str(event["error"].get("code", "error")),
                                             f"request {seq} case {case}: {event['error']}")
                    continue
                times.append(float(event.get("elapsed_ms", 0.0)) / 1000)
                outcome = run_outcome(event["result"], lambda out, c=case: w.check(c, out),
                                      f"request {seq} case {case}")
                if not outcome.ok:
                    failures[case] = outcome
        if failures:
            return failures[min(failures)], times
        if len(times) != JUDGE_CASES:
            return Outcome(False, "200", "internal_error",
                           f"request {seq}: {len(times)} of {JUDGE_CASES} cases came back"), times
        return Outcome(True, "200", "ok"), times


class JudgeBareTarget(SpawnTarget):
    """Submissions as local processes: the host's gcc, then the cases posix_spawned, the
    whole submission on one thread of the pool."""

    def __init__(self, env: BareEnv, workload: Workload, workers: int,
                 timeout_s: float | None = None) -> None:
        gcc = shutil.which("gcc", path=HOST_PATH)
        if gcc is None:
            raise LoadTestError(f"the {workload.name} bare baseline compiles with the host's "
                                "gcc, which is missing: apt-get install gcc libc6-dev, or "
                                "pass --no-bare")
        super().__init__(workload, workers, timeout_s)
        self.gcc = gcc
        self.scratch = env.scratch
        self.source = str(write_files(workload, env.scratch)[0][1])
        self.gcc_env = {"PATH": HOST_PATH, "TMPDIR": str(env.scratch)}
        self.ids = itertools.count()
        self.times = SubmissionTimes()

    async def send(self, seq: int) -> Outcome:
        binary = self.scratch / f"solution.{next(self.ids)}"
        outcome, compile_s, cases_s = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._submit, seq, binary)
        self.times.add(compile_s, cases_s)
        return outcome

    def _failed(self, status: str, what: str, code: int | None, err: bytes) -> Outcome:
        if code is None:
            return Outcome(False, self.side, "timeout",
                           f"{what} killed after {self.timeout_s:g} s")
        return Outcome(False, self.side, status, f"{what} exit status {code}: "
                       f"{clip(err.decode(errors='replace'))}")

    def _submit(self, seq: int, binary: Path) -> tuple[Outcome, float | None, list[float]]:
        w = self.workload
        assert w.stdin is not None and w.expect is not None
        try:
            start = time.monotonic()
            code, _, err = self._spawn(Invocation(
                self.gcc, judge_compile(self.source, str(binary)), self.gcc_env), None)
            compile_s = time.monotonic() - start
            if code != 0:
                return self._failed("compile_error", f"request {seq}: gcc", code, err), None, []
            times: list[float] = []
            run = Invocation(str(binary), [str(binary)], {})
            for case in range(JUDGE_CASES):
                start = time.monotonic()
                code, out, err = self._spawn(run, w.stdin(case).encode())
                times.append(time.monotonic() - start)
                what = f"request {seq} case {case}"
                if code != 0:
                    return self._failed("nonzero_exit", what, code, err), compile_s, times
                if not w.check(case, out.decode(errors="replace")):
                    return (Outcome(False, self.side, "wrong_answer",
                                    f"{what}: bare output {out[:80]!r}"), compile_s, times)
            return Outcome(True, self.side, "ok"), compile_s, times
        finally:
            binary.unlink(missing_ok=True)


def times_from_now(target: object) -> SubmissionTimes | None:
    """A judge target's compile and case times, cleared: call it after the warm-up, and
    they cover what follows. None for any other target."""
    if not isinstance(target, JudgeHttpTarget | JudgeBareTarget):
        return None
    target.times.clear()
    return target.times
