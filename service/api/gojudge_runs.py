"""A go-judge request (service/api/gojudge.py) as sandboxd runs: each cmd translated into a
run body (RUN_BODY) and prepared by `runs.prepare_run` (so its checks, the tenant's file
cache and the admission slots are those of `POST /v1/runs`), run apart or wired by its
pipeMapping (Engine.pipeline), and its result given in go-judge's form: status names,
nanoseconds, bytes, collectors, copyOut / copyOutCached / fileError.

go-judge has no images: every cmd runs in the configured image and policy, its relative
paths (`copyIn` keys, `copyOut` names, `args[0]`) below the configured working directory.
An error of the run body is renamed to the go-judge field it came from."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox import (
    MAX_PIPELINE_CAPTURE_BYTES,
    Engine,
    Limits,
    NotFound,
    PipelineSpec,
    PipeSpec,
    PolicyError,
    RunOutcome,
    SandboxError,
    Status,
)
from service.api import State, ready
from service.api.files import about
from service.api.runs import PreparedRun, prepare_run
from service.auth import Principal
from service.bodies import LIMIT_NAMES, check_path
from service.config import GojudgeConfig
from service.errors import ApiError, bad_request, blame
from service.schemas import RUN_BODY

MiB = 1 << 20
COPY_OUT_MAX = 64 * MiB     # go-judge's default copy-out-limit
STDIN_MAX = 64 * MiB        # a run body's stdin (RUN_BODY)
NS_PER_MS = 1_000_000

STATUS = {Status.OK: "Accepted", Status.NONZERO_EXIT: "Nonzero Exit Status",
          Status.SIGNALED: "Signalled", Status.TIME_LIMIT: "Time Limit Exceeded",
          Status.WALL_LIMIT: "Time Limit Exceeded",
          Status.MEMORY_LIMIT: "Memory Limit Exceeded",
          Status.OUTPUT_LIMIT: "Output Limit Exceeded",
          Status.SYSCALL_BLOCKED: "Dangerous Syscall", Status.INTERNAL_ERROR: "Internal Error"}
ACCEPTED = STATUS[Status.OK]
FILE_ERROR = "File Error"
OUTPUT_LIMIT = STATUS[Status.OUTPUT_LIMIT]

_RUN_LIMITS = set(LIMIT_NAMES)
# Our run body's fields -> the go-judge field they came from (errors name the latter).
_LIMIT_FIELDS = {"cpu_ms": "cpuLimit", "wall_ms": "clockLimit", "memory_bytes": "memoryLimit",
                 "stack_bytes": "stackLimit", "pids": "procLimit",
                 "cpu_quota_cores": "cpuRateLimit", "cpuset": "cpuSetLimit",
                 "address_space_bytes": "addressSpaceLimit"}


@dataclass(frozen=True)
class Collector:
    """A collected output (go-judge's {name, max} on fd 1 or 2)."""

    name: str
    max: int


@dataclass(frozen=True)
class Wanted:
    """One name of copyOut or copyOutCached: a collector's, or a file's path."""

    name: str            # as the request gave it, without a trailing '?'
    path: str | None     # None: a collector
    optional: bool
    cached: bool


@dataclass
class Command:
    """One cmd of a request, prepared: its run and what its result must hold."""

    job: PreparedRun
    outputs: tuple[Collector | None, Collector | None]     # fds 1 and 2
    wanted: tuple[Wanted, ...]
    copy_out_max: int
    truncate: bool
    copy_in: dict[str, str]      # a copyIn file's path in the container -> its key


@dataclass(frozen=True)
class Wiring:
    """A request's pipeMapping, checked: the fds it pipes and the names its proxied pipes
    are copied out under (go-judge: a copyOut name of the writing cmd)."""

    pipes: tuple[PipeSpec, ...] = ()
    piped: dict[tuple[int, int], str] = field(default_factory=dict)  # (cmd, fd) -> by whom
    names: dict[int, dict[str, int]] = field(default_factory=dict)   # cmd -> name -> pipe


def go_words(message: str) -> str:
    """A message of the service's in go-judge's words: its clients upload with POST /file."""
    return message.replace("POST /v1/files", "POST /file")


def wiring_of(mapping: list[dict[str, Any]], n: int) -> Wiring:
    """A request's pipeMapping (of `n` cmds) checked and turned into the engine's pipes."""
    w = Wiring()
    pipes = []
    budget = MAX_PIPELINE_CAPTURE_BYTES
    for k, p in enumerate(mapping):
        ends = []
        for end, fds in (("in", (1, 2)), ("out", (0,))):
            where = f"pipeMapping[{k}].{end}"
            i, fd = p[end]["index"], p[end]["fd"]
            if i >= n:
                raise bad_request(f"{where}.index: there is no cmd[{i}] ({n} given)",
                                  f"{where}.index")
            if fd not in fds:
                raise bad_request(f"{where}.fd: a pipe goes from fd 1 or 2 (in) to fd 0 "
                                  "(out)", f"{where}.fd")
            if (i, fd) in w.piped:
                raise bad_request(f"{where}: fd {fd} of cmd[{i}] is also piped by "
                                  f"{w.piped[(i, fd)]}", where)
            w.piped[(i, fd)] = where
            ends.append((i, fd))
        capture = 0
        if p.get("proxy") and p.get("name"):
            # The pipeline keeps MAX_PIPELINE_CAPTURE_BYTES in all: a later pipe keeps less
            # (go-judge has no such total; refusing the request would be a surprise).
            capture = min(p.get("max") or COPY_OUT_MAX, budget)
            budget -= capture
            w.names.setdefault(ends[0][0], {})[p["name"]] = k
        pipes.append(PipeSpec(ends[0], ends[1], capture_bytes=capture))
    return replace(w, pipes=tuple(pipes))


class _Translation:
    """One cmd turned into a run body, with the go-judge field each part came from."""

    def __init__(self, gj: GojudgeConfig, cmd: dict[str, Any], index: int, wiring: Wiring,
                 image_from: str) -> None:
        at = f"cmd[{index}]"
        self.gj, self.cmd, self.at, self.index, self.wiring = gj, cmd, at, index, wiring
        self.origin: dict[str, str] = {"image": image_from,
                                       "policy": "gojudge.policy (the service's config)",
                                       "cmd": f"{at}.args", "env": f"{at}.env",
                                       "stdin": f"{at}.files[0].content"}
        self.files: list[dict[str, Any]] = []
        self.copy_in: list[str] = []      # the copyIn key of each of `files`

    def path(self, name: str, field: str) -> str:
        """A go-judge path: relative ones are below the working directory."""
        return check_path(self.joined(name), field)

    def joined(self, name: str) -> str:
        return name if name.startswith("/") else f"{self.gj.workdir.rstrip('/')}/{name}"

    def file(self, path: str, f: dict[str, Any], field: str) -> None:
        if "src" in f:
            raise bad_request(f"{field}.src: host paths are refused (a run reaches no host "
                              "file); upload it with POST /file and give its fileId",
                              f"{field}.src")
        if "symlink" in f:
            raise bad_request(f"{field}.symlink: symbolic links are not supported; copy the "
                              "file in under each name", f"{field}.symlink")
        entry: dict[str, Any] = {"path": path, "mode": 0o755}
        ours = f"files[{len(self.files)}]"
        self.origin[ours] = field
        if "fileId" in f:
            entry["file_id"] = f["fileId"]
            self.origin[f"{ours}.file_id"] = f"{field}.fileId"
        elif "content" in f:
            entry["content"] = f["content"]
            self.origin[f"{ours}.content"] = f"{field}.content"
        else:
            raise bad_request(f"{field}: give content or fileId", field)
        self.files.append(entry)

    def stdio(self) -> tuple[dict[str, Any] | None, tuple[Collector | None, ...]]:
        """files[0] (stdin: content or fileId) and the collectors of fds 1 and 2."""
        # A piped fd's entry is the pipe's: what is given there is not used (refusing it
        # would be a rule between two arrays that no JSON Schema of the document can say).
        given = [None if (self.index, fd) in self.wiring.piped else f
                 for fd, f in enumerate(self.cmd.get("files", []))]
        outs: list[Collector | None] = []
        for fd in (1, 2):
            f = given[fd] if fd < len(given) else None
            field = f"{self.at}.files[{fd}]"
            if f is None:
                outs.append(None)
            elif "name" in f and "max" in f:
                outs.append(Collector(f["name"], f["max"]))
            else:
                raise bad_request(f"{field}: an output takes a collector, "
                                  '{"name": "stdout", "max": 10240}', field)
        stdin = given[0] if given else None
        if stdin is not None:
            field = f"{self.at}.files[0]"
            if "src" in stdin:
                raise bad_request(f"{field}.src: host paths are refused; give content, or a "
                                  "fileId from POST /file", f"{field}.src")
            if not ("content" in stdin or "fileId" in stdin):
                raise bad_request(f"{field}: stdin takes content or fileId", field)
        for f, fd in ((f, fd) for fd, f in enumerate(given) if f is not None):
            for flag in ("streamIn", "streamOut"):
                if f.get(flag):
                    where = f"{self.at}.files[{fd}].{flag}"
                    raise bad_request(f"{where}: streams are not supported; use POST /run "
                                      "and read the result", where)
        return stdin, tuple(outs)

    def limits(self, outputs: tuple[Collector | None, ...]) -> dict[str, Any]:
        c, at = self.cmd, self.at
        ms: dict[str, Any] = {}
        if c.get("cpuLimit"):
            ms["cpu_ms"] = max(1, math.ceil(c["cpuLimit"] / NS_PER_MS))
        # As go-judge: realCpuLimit, its older name for the clock limit, wins when set.
        clock = c.get("realCpuLimit") or c.get("clockLimit")
        if clock:
            ms["wall_ms"] = max(1, math.ceil(clock / NS_PER_MS))
            self.origin["limits.wall_ms"] = (f"{at}.realCpuLimit" if c.get("realCpuLimit")
                                             else f"{at}.clockLimit")
        elif "cpu_ms" in ms:  # go-judge: without a clock limit, the CPU limit is the clock's
            ms["wall_ms"] = ms["cpu_ms"]
            self.origin["limits.wall_ms"] = f"{at}.cpuLimit"
        for ours, theirs in (("memory_bytes", "memoryLimit"), ("stack_bytes", "stackLimit"),
                             ("pids", "procLimit")):
            if c.get(theirs):
                ms[ours] = c[theirs]
        if c.get("cpuRateLimit"):
            if not 10 <= c["cpuRateLimit"] <= 4_096_000:  # a cgroup's quota: 1 % of a CPU
                raise bad_request(f"{at}.cpuRateLimit: give 10 to 4096000 (1000 is one CPU)",
                                  f"{at}.cpuRateLimit")
            ms["cpu_quota_cores"] = c["cpuRateLimit"] / 1000  # go-judge: 1000 is one CPU
        if c.get("cpuSetLimit"):
            ms["cpuset"] = c["cpuSetLimit"]
        if c.get("addressSpaceLimit"):
            if "memory_bytes" not in ms:
                raise bad_request(f"{at}.addressSpaceLimit: limits the address space to "
                                  "memoryLimit; give memoryLimit too", f"{at}.addressSpaceLimit")
            ms["address_space_bytes"] = ms["memory_bytes"]
        collected = [o.max for o in outputs if o is not None]
        if collected:
            # One cap per stream for the runtime; each collector's own max is applied after.
            ms["output_bytes"] = max(1, *collected)
            self.origin["limits.output_bytes"] = f"{at}.files[{1 if outputs[0] else 2}].max"
        for ours, theirs in _LIMIT_FIELDS.items():
            self.origin.setdefault(f"limits.{ours}", f"{at}.{theirs}")
        return ms

    def wanted(self, outputs: tuple[Collector | None, ...]) -> tuple[Wanted, ...]:
        names = {o.name for o in outputs if o is not None} | set(
            self.wiring.names.get(self.index, ()))
        out: list[Wanted] = []
        for key, cached in (("copyOut", False), ("copyOutCached", True)):
            for i, given in enumerate(self.cmd.get(key, ())):
                name = given.removesuffix("?")
                field = f"{self.at}.{key}[{i}]"
                if not name:
                    raise bad_request(f"{field}: name a file or a collector", field)
                path = None if name in names else self.path(name, field)
                out.append(Wanted(name, path, given.endswith("?"), cached))
                if path is not None:
                    ours = "copy_out_cached" if cached else "copy_out"
                    self.origin[f"{ours}[{sum(1 for w in out if w.cached == cached) - 1}]"] = \
                        field
        return tuple(out)

    def body(self, stdin: dict[str, Any] | None, limits: dict[str, Any],
             wanted: tuple[Wanted, ...]) -> dict[str, Any]:
        c = self.cmd
        env = {}
        for i, pair in enumerate(c.get("env", ())):
            name, eq, value = pair.partition("=")
            if not eq or not name:
                field = f"{self.at}.env[{i}]"
                raise bad_request(f"{field}: {pair[:64]!r} is not NAME=value", field)
            env[name] = value
        for key, f in sorted(c.get("copyIn", {}).items()):
            self.file(self.path(key, f'{self.at}.copyIn["{key}"]'), f,
                      f'{self.at}.copyIn["{key}"]')
            self.copy_in.append(key)
        args = list(c["args"])
        # go-judge execs args[0] as a path, relative to the working directory.
        if "/" not in args[0] and any(
                f["path"] == self.joined(args[0]) for f in self.files):
            args[0] = f"./{args[0]}"
        body: dict[str, Any] = {
            "image": self.gj.image, "cmd": args, "env": env, "cwd": self.gj.workdir,
            "files": self.files, "limits": limits,
            "copy_out": [w.path for w in wanted if w.path and not w.cached],
            "copy_out_cached": [w.path for w in wanted if w.path and w.cached]}
        if self.gj.policy is not None:
            body["policy"] = self.gj.policy
        if stdin is not None and "content" in stdin:
            body["stdin"] = stdin["content"]
        return body

    def renamed(self, e: ApiError) -> ApiError:
        """`e` as the go-judge request's field; our run body's field is no help to it."""
        if e.field is None:
            return e
        found = max((k for k in self.origin if e.field == k or e.field.startswith(
            (k + ".", k + "["))), key=len, default=None)
        if found is None:
            return e
        theirs = self.origin[found] + e.field[len(found):]
        message = go_words(e.message.removeprefix(e.field).removeprefix(": "))
        return ApiError(e.status, e.code, f"{theirs}: {message}", theirs, e.headers)


_SCALE = {"cpu_ms": NS_PER_MS, "wall_ms": NS_PER_MS, "cpu_quota_cores": 1000}


def _within(eng: Engine, name: str | None, limits: dict[str, Any]) -> None:
    """The limits against the policy's maxima before anything runs, in go-judge's units (the
    error is renamed to the go-judge field by the caller)."""
    policy = eng.policy(name)
    for key, value in limits.items():
        top = getattr(policy.profile.maxima, key)
        if key != "cpuset" and top is not None and value > top:
            raise bad_request(f"limits.{key}: above what this service's policy "
                              f"{policy.name!r} allows: at most {round(top * _SCALE.get(key, 1))}",
                              f"limits.{key}")
    try:
        policy.limits(Limits.from_dict(limits))
    except PolicyError as e:
        raise bad_request(str(e), str(e).partition(":")[0]) from None


def _stdin(eng: Engine, who: Principal, file_id: str, field: str) -> bytes:
    """A cached file as a run's stdin, held in memory: no larger than a run body's stdin."""
    with about(field):
        f = eng.files.open(who.tenant, file_id)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > STDIN_MAX:
            raise bad_request(f"{field}: this cached file ({size} bytes) is over the "
                              f"{STDIN_MAX} bytes stdin may hold; copy it in (copyIn) and "
                              "have the program read it", field)
        return f.read()


def image_field(query: str | None) -> str:
    """Where a /run's image came from, for its errors."""
    return "image (the query parameter)" if query else "gojudge.image (the service's config)"


def prepare(st: State, who: Principal, gj: GojudgeConfig, cmd: dict[str, Any], index: int,
            wiring: Wiring, image_from: str) -> Command:
    """cmd[index] of a validated request as a run of `who`'s, checked before anything runs;
    a 4xx names the go-judge field (`image_from`: where the image came from)."""
    t = _Translation(gj, cmd, index, wiring, image_from)
    at = t.at
    if cmd.get("tty"):
        raise bad_request(f"{at}.tty: terminals are not supported", f"{at}.tty")
    stdin, outputs = t.stdio()
    wanted = t.wanted(outputs)
    limits = t.limits(outputs)
    body = t.body(stdin, {k: v for k, v in limits.items() if k in _RUN_LIMITS}, wanted)
    eng = ready(st)
    try:  # errors of our run body, renamed to the go-judge fields they came from
        body = RUN_BODY.validate(body, "")
        _within(eng, gj.policy, limits)
        job = prepare_run(st, who, body)
    except ApiError as e:
        raise t.renamed(e) from e
    # A run body carries no cpuset, CPU quota or address space limit; the engine's does.
    job.spec = replace(job.spec, limits=Limits.from_dict(limits))
    if stdin is not None and "fileId" in stdin:
        job.spec = replace(job.spec, stdin=_stdin(eng, who, stdin["fileId"],
                                                  f"{at}.files[0].fileId"))
    return Command(job, (outputs[0], outputs[1]), wanted,
                   cmd.get("copyOutMax") or COPY_OUT_MAX, cmd.get("copyOutTruncate", False),
                   {f["path"]: key for f, key in zip(t.files, t.copy_in, strict=True)})


# Results ---------------------------------------------------------------------------------

_FILE_ERROR_KINDS = (("directory", "CopyOutNotRegularFile"),
                     ("only regular files", "CopyOutNotRegularFile"),
                     ("byte", "CopyOutSizeExceeded"), ("quota", "CopyOutCreateFile"))


def _kind(message: str) -> str:
    return next((k for word, k in _FILE_ERROR_KINDS if word in message), "CopyOutOpen")


async def _result(st: State, who: Principal, c: Command, outcome: RunOutcome,
                  proxied: dict[str, bytes]) -> dict[str, Any]:
    """The go-judge result of one cmd: `proxied` holds what its proxied pipes carried, by
    name."""
    r = outcome.result
    # go-judge: a program that cannot be started is an Internal Error, not its exit code.
    status = STATUS[Status.INTERNAL_ERROR] if r.error else STATUS[r.status]
    errors: list[dict[str, str]] = []
    collected = dict(proxied)
    for out, data in zip(c.outputs, (r.stdout, r.stderr), strict=True):
        if out is None:
            continue
        collected[out.name] = bytes(data[:out.max])
        if len(data) > out.max:
            errors.append({"name": out.name, "type": "CollectSizeExceeded",
                           "message": f"{out.name}: output over {out.max} bytes"})
            if status == ACCEPTED:
                status = OUTPUT_LIMIT
    files: dict[str, str] = {}
    ids: dict[str, str] = {}
    names: dict[str, str] = {}
    for w in c.wanted:
        data: bytes | None = None
        if w.path is None:
            data = collected[w.name]
        elif w.cached and w.path in outcome.copied.cached:
            ids[w.name] = outcome.copied.cached[w.path].id
            names[ids[w.name]] = w.name
            continue
        elif w.path in outcome.copied.files:
            data = outcome.copied.files[w.path]
        if data is None:
            message = outcome.copied.errors.get(w.path or w.name, "not copied")
            if not w.optional:
                errors.append({"name": w.name, "type": _kind(message), "message": message})
            continue
        if w.path is not None and len(data) > c.copy_out_max:  # collectors have their max
            errors.append({"name": w.name, "type": "CopyOutSizeExceeded",
                           "message": f"{w.name}: {len(data)} bytes, over copyOutMax "
                                      f"({c.copy_out_max})"})
            if not c.truncate:
                continue
            data = data[:c.copy_out_max]
        if w.cached:
            with about(w.name):
                ids[w.name] = (await ready(st).files.put_bytes(who.tenant, data)).id
            names[ids[w.name]] = w.name
        else:
            files[w.name] = data.decode("utf-8", "replace")
    if errors and status == ACCEPTED and any(e["type"] != "CollectSizeExceeded"
                                             for e in errors):
        status = FILE_ERROR
    if names:
        FileNames(st).remember(who, names)
    out: dict[str, Any] = {
        "status": status,
        "exitStatus": r.exit_code if r.exit_code is not None else (r.signal or 0),
        "time": round((r.cpu_ms or 0) * NS_PER_MS),
        "memory": r.memory_peak_bytes or 0,
        "runTime": round(r.wall_ms * NS_PER_MS)}
    if r.error:
        out["error"] = r.error
    elif status == FILE_ERROR:
        out["error"] = next(e["message"] for e in errors if e["type"] != "CollectSizeExceeded")
    if any(not w.cached for w in c.wanted):
        out["files"] = files
    if any(w.cached for w in c.wanted):
        out["fileIds"] = ids
    if errors:
        out["fileError"] = errors
    return out


def _observe(st: State, outcome: RunOutcome) -> None:
    st.metrics.observe_run(str(outcome.result.status), outcome.result.setup_ms,
                           outcome.result.wall_ms)


def _copy_in_failed(c: Command, e: SandboxError) -> dict[str, Any]:
    """go-judge's answer when a file cannot be copied in (a path the image has read-only, a
    cached file gone meanwhile): a File Error result, nothing run."""
    message = str(e)
    name = next((key for path, key in c.copy_in.items()
                 if message.startswith((path + ":", path + " "))), "copyIn")
    return {"status": FILE_ERROR, "exitStatus": 0, "time": 0, "memory": 0, "runTime": 0,
            "error": message,
            "fileError": [{"name": name, "type": "CopyInCreateFile", "message": message}]}


async def _run(st: State, who: Principal, c: Command) -> dict[str, Any]:
    try:
        async with st.admission.slot(who):
            outcome = await c.job.start(c.job.spec, None, None)
    except (PolicyError, NotFound) as e:  # the request was checked: its files were refused
        return _copy_in_failed(c, e)
    _observe(st, outcome)
    return await _result(st, who, c, outcome, {})


async def run_apart(st: State, who: Principal, cmds: list[Command]) -> list[dict[str, Any]]:
    """Commands without pipes, run at once as go-judge runs them; the first failure ends
    the others."""
    if len(cmds) == 1:
        return [await _run(st, who, cmds[0])]
    tasks = [asyncio.ensure_future(_run(st, who, c)) for c in cmds]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_PIPELINE_FIELDS = (("processes[", "cmd["), ("pipes[", "pipeMapping["), (".src", ".in"),
                    (".dst", ".out"))


async def run_wired(st: State, who: Principal, gj: GojudgeConfig, cmds: list[Command],
                    wiring: Wiring, image_from: str) -> list[dict[str, Any]]:
    """Commands wired by pipeMapping: one pipeline, each cmd in a container of its own (as
    go-judge gives each its own environment), in one admission slot."""
    eng = ready(st)
    spec = PipelineSpec(processes=tuple(c.job.spec for c in cmds), pipes=wiring.pipes,
                        shared_container=False)
    with blame(image_from):
        image = await eng.image(gj.image or "", tenant=who.tenant)
    try:
        async with st.admission.slot(who):
            with blame("pipeMapping"):
                try:
                    outcome = await eng.pipeline(image, spec, tenant=who.tenant,
                                                 policy=gj.policy)
                except (PolicyError, NotFound) as e:
                    if str(e).startswith("/"):  # a file refused: the others never ran either
                        return [_copy_in_failed(c, e) for c in cmds]
                    raise
    except ApiError as e:  # the pipeline's own names for what go-judge calls otherwise
        for ours, theirs in _PIPELINE_FIELDS:
            e.message = e.message.replace(ours, theirs)
            e.field = e.field and e.field.replace(ours, theirs)
        raise
    results = []
    for i, (c, o) in enumerate(zip(cmds, outcome.processes, strict=True)):
        _observe(st, o)
        proxied = {name: outcome.captured[k] for name, k in wiring.names.get(i, {}).items()}
        results.append(await _result(st, who, c, o, proxied))
    return results


# File names ------------------------------------------------------------------------------

class FileNames:
    """The names go-judge's GET /file lists beside each id: the upload's file name, or the
    copyOutCached name. Kept per tenant in the state directory; the file cache itself keeps
    no names (the same bytes may have many), so an id without one is listed as itself."""

    def __init__(self, st: State) -> None:
        self.path = st.config.state_dir / "gojudge-names.db"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS names (tenant TEXT NOT NULL, id TEXT NOT "
                       "NULL, name TEXT NOT NULL, PRIMARY KEY (tenant, id)) WITHOUT ROWID")
            yield db

    def remember(self, who: Principal, names: dict[str, str]) -> None:
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO names VALUES (?, ?, ?)",
                           [(who.tenant.id, i, n) for i, n in names.items()])

    def listed(self, who: Principal, ids: list[str]) -> dict[str, str]:
        """Each of `ids` (the tenant's files) with its name; names of files gone are
        forgotten."""
        with self._db() as db:
            known = dict(db.execute("SELECT id, name FROM names WHERE tenant = ?",
                                    (who.tenant.id,)).fetchall())
            gone = set(known) - set(ids)
            db.executemany("DELETE FROM names WHERE tenant = ? AND id = ?",
                           [(who.tenant.id, i) for i in gone])
        return {i: known.get(i, i) for i in ids}


