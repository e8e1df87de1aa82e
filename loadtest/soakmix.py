"""The soak's mix: the kinds of request a judge service gets, each with the one answer it
must get. A run's answer must be its verdict (status and exit code) and, where the run
carries files, exactly its files; every answer must pass the service's own response schema
(service/replies.py, results.py: no unknown field, every required one, every type), so a result that
is answered but malformed counts as much as one that is wrong.

Each request's outcome names what went wrong: `wrong_verdict` (answered, well-formed, not
its answer), `malformed` (not the schema), an error code (answered with another status), or
`transport` (no answer at all: the connection failed or the request timed out).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import orjson

from loadtest.http.stats import Outcome
from loadtest.http.targets import answer, clip
from sandbox import Invalid, convert
from sandbox.runtime.run import FALLBACK_MEMORY
from service.replies import CachedFile as CACHED_FILE
from service.replies import Container as SESSION
from service.replies import Image as IMAGE
from service.results import RunResult as RUN_RESULT

ReplyType = type[msgspec.Struct]

MiB = 1 << 20
# Room for every kill to be seen on a loaded 2-core machine, within the judge maxima.
WALL_MS = 20_000
POLICY = "judge"
ENV = {"PATH": "/bin", "BIN": "/bin", "TMPDIR": "/tmp"}
# What the soak stores in the file cache before it starts: every `cached` run binds it.
CACHED_CONTENT = b"a file of the file cache, bound read-only into every cached run\n"
# What every `copy_out_cached` run stores: the same bytes each time, so the cache holds one
# entry however long the soak runs (a new entry per run would be growth by design).
STORED_CONTENT = "the output every copy_out_cached run stores\n"


def file_id(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class Context:
    """What every request of the soak shares: the client, the service, the image, and what
    the soak stored before it began."""

    http: aiohttp.ClientSession
    url: str
    image: str
    image_digest: str
    cached_id: str
    # The containers whose runs answered (a run's id is "<container id>-<n>"): what the
    # soak may call its own among the cgroups of a base other services share.
    containers: set[str] = field(default_factory=set)

    def saw(self, doc: dict[str, Any]) -> None:
        run_id = doc.get("id")
        if isinstance(run_id, str) and "-" in run_id:
            self.containers.add(run_id.rsplit("-", 1)[0])


def _malformed(doc: dict[str, Any], schema: ReplyType, what: str) -> Outcome | None:
    try:
        convert(doc, schema)
    except Invalid as e:
        return Outcome(False, "200", "malformed", f"{what}: {clip(e.message)}")
    return None


async def _call(ctx: Context, method: str, path: str, expected: int, schema: ReplyType | None,
                what: str, body: Any = None, data: bytes | None = None
                ) -> dict[str, Any] | Outcome:
    """One request: its JSON object, when answered with `expected` and well-formed, else
    the failed Outcome. A 204 has no body to check."""
    payload = orjson.dumps(body) if body is not None else data
    kind = "application/json" if body is not None else "application/octet-stream"
    async with ctx.http.request(method, ctx.url + path, data=payload,
                                headers={"Content-Type": kind}) as resp:
        raw = await resp.read()
        status = resp.status
    if expected == 204 and status == 204:
        return {}
    doc = answer(status, raw, expected)
    if isinstance(doc, Outcome):
        return Outcome(False, doc.http, doc.status, f"{what}: {doc.error}")
    if schema is not None and (bad := _malformed(doc, schema, what)) is not None:
        return bad
    if schema is RUN_RESULT:
        ctx.saw(doc)
    return doc


Check = Callable[[int, Context, dict[str, Any]], str | None]
Extra = Callable[[int, Context], dict[str, Any]]


def _nothing(seq: int, ctx: Context) -> dict[str, Any]:
    return {}


def _no_check(seq: int, ctx: Context, doc: dict[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Case:
    """One kind of request in the mix, and its share of it."""

    name: str
    measures: str
    weight: int

    async def send(self, ctx: Context, seq: int) -> Outcome:
        raise NotImplementedError


@dataclass(frozen=True)
class Fallback:
    """A run's answer where the service has no cgroup for its limit and says so (the result's
    `warnings` hold `warning`): the limit is then an rlimit, and the run ends otherwise."""

    warning: str
    status: str
    exit_code: int | None


@dataclass(frozen=True)
class RunCase(Case):
    """POST /v1/runs on the judge policy (a warm container, reset after the run)."""

    cmd: tuple[str, ...] = ()
    status: str = "ok"
    exit_code: int | None = 0     # None: ended by a signal (the service's kill, or its own)
    limits: dict[str, int] = field(default_factory=dict)
    extra: Extra = _nothing       # more of the body: files in, copy_out
    check: Check = _no_check      # what else the result must hold: output, files out
    fallback: Fallback | None = None

    def body(self, ctx: Context, seq: int) -> dict[str, Any]:
        return {"image": ctx.image, "cmd": list(self.cmd), "policy": POLICY, "env": ENV,
                "limits": {"wall_ms": WALL_MS, **self.limits}, **self.extra(seq, ctx)}

    def wrong(self, seq: int, ctx: Context, doc: dict[str, Any]) -> str | None:
        """What is wrong with this run's result, or None when it is exactly its answer."""
        status, exit_code = self.status, self.exit_code
        if self.fallback is not None and self.fallback.warning in (doc.get("warnings") or ()):
            status, exit_code = self.fallback.status, self.fallback.exit_code
        if (doc.get("status"), doc.get("exit_code")) != (status, exit_code):
            return (f"{self.name}: expected {status} exit {exit_code}, got "
                    f"{doc.get('status')} exit {doc.get('exit_code')} signal "
                    f"{doc.get('signal')} (pool_hit {doc.get('pool_hit')}, wall "
                    f"{doc.get('wall_ms')} ms, id {doc.get('id')}): "
                    f"{clip(str(doc.get('error') or doc.get('stderr') or ''))}")
        why = self.check(seq, ctx, doc)
        return None if why is None else f"{self.name}: {why} (id {doc.get('id')})"

    async def send(self, ctx: Context, seq: int) -> Outcome:
        doc = await _call(ctx, "POST", "/v1/runs", 200, RUN_RESULT, self.name,
                          self.body(ctx, seq))
        if isinstance(doc, Outcome):
            return doc
        hit = doc.get("pool_hit") if isinstance(doc.get("pool_hit"), bool) else None
        why = self.wrong(seq, ctx, doc)
        if why is not None:
            return Outcome(False, "200", "wrong_verdict", why, hit)
        return Outcome(True, "200", str(doc.get("status")), "", hit)


@dataclass(frozen=True)
class SessionCase(Case):
    """A session's life: create it (POST /v1/containers), one exec that echoes its stdin,
    delete it; all three must succeed, the exec's output be exactly its input."""

    async def send(self, ctx: Context, seq: int) -> Outcome:
        made = await _call(ctx, "POST", "/v1/containers", 201, SESSION, "session create",
                           {"image": ctx.image, "policy": POLICY})
        if isinstance(made, Outcome):
            return made
        sid = str(made["id"])
        try:
            text = f"session {seq}\n"
            ran = await _call(ctx, "POST", f"/v1/containers/{sid}/exec", 200, RUN_RESULT,
                              "session exec", {"cmd": ["cat"], "env": ENV, "stdin": text,
                                               "limits": {"wall_ms": WALL_MS}})
        finally:
            gone = await _call(ctx, "DELETE", f"/v1/containers/{sid}", 204, None,
                               "session delete")
        if isinstance(ran, Outcome):
            return ran
        if isinstance(gone, Outcome):
            return gone
        if (ran.get("status"), ran.get("stdout")) != ("ok", text):
            return Outcome(False, "200", "wrong_verdict",
                           f"{self.name}: exec gave {ran.get('status')} "
                           f"{clip(str(ran.get('stdout')))!r}, expected ok {text!r}")
        return Outcome(True, "200", "ok")


@dataclass(frozen=True)
class PullCase(Case):
    """POST /v1/images/pull of the soak's image, present already: the registry is asked
    for the tag again and the answer must be the same image."""

    async def send(self, ctx: Context, seq: int) -> Outcome:
        doc = await _call(ctx, "POST", "/v1/images/pull", 200, IMAGE, "pull",
                          {"reference": ctx.image})
        if isinstance(doc, Outcome):
            return doc
        if doc["digest"] != ctx.image_digest:
            return Outcome(False, "200", "wrong_verdict",
                           f"{self.name}: got {doc['digest']}, expected {ctx.image_digest}")
        return Outcome(True, "200", "ok")


def _stdout(expected: Callable[[int, Context], str]) -> Check:
    def check(seq: int, ctx: Context, doc: dict[str, Any]) -> str | None:
        want = expected(seq, ctx)
        got = doc.get("stdout")
        return None if got == want else f"stdout {clip(str(got))!r}, expected {want!r}"
    return check


def _inline(seq: int, ctx: Context) -> dict[str, Any]:
    return {"files": [{"path": "/tmp/in", "content": f"inline {seq}\n"}]}


def _cached(seq: int, ctx: Context) -> dict[str, Any]:
    return {"files": [{"path": "/tmp/in", "file_id": ctx.cached_id}]}


def _copy_out(seq: int, ctx: Context) -> dict[str, Any]:
    return {"env": {**ENV, "OUT": f"out {seq}"}, "copy_out": ["/tmp/out"]}


def _copied(seq: int, ctx: Context, doc: dict[str, Any]) -> str | None:
    files = doc.get("files") or {}
    want = f"out {seq}\n"
    got = files.get("/tmp/out")
    return None if got == want else (f"copy_out gave {clip(str(got))!r}, expected {want!r} "
                                     f"({doc.get('file_errors')})")


def _copy_out_cached(seq: int, ctx: Context) -> dict[str, Any]:
    return {"env": {**ENV, "OUT": STORED_CONTENT.rstrip("\n")},
            "copy_out_cached": ["/tmp/out"]}


def _stored(seq: int, ctx: Context, doc: dict[str, Any]) -> str | None:
    ref = (doc.get("file_ids") or {}).get("/tmp/out") or {}
    want = file_id(STORED_CONTENT.encode())
    return None if ref.get("id") == want else (f"copy_out_cached gave {ref}, expected "
                                               f"{want} ({doc.get('file_errors')})")


def _sh(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


_WRITE_OUT = _sh('echo "$OUT" > /tmp/out')

# `true` is the innocent run the others' kills must never reach; output floods and CPU
# loops are the kills that reached it before (issue #10), so they come often too.
MIX: tuple[Case, ...] = (
    RunCase("true", "busybox true, executed directly", 8, ("true",)),
    RunCase("exit3", "a shell that exits 3", 2, _sh("exit 3"), "nonzero_exit", 3),
    RunCase("flood", "yes, cut at output_bytes 4096", 4, ("yes",), "output_limit", None,
            {"output_bytes": 4096}),
    RunCase("spin", "an endless shell loop, cut at cpu_ms 50", 3, _sh("while :; do :; done"),
            "time_limit", None, {"cpu_ms": 50}),
    RunCase("memory", "dd into a 64 MiB buffer, cut at memory_bytes 16 MiB", 1,
            _sh('"$BIN/dd" if=/dev/zero of=/dev/null bs=64M count=1'), "memory_limit", None,
            {"memory_bytes": 16 * MiB},
            # Without a memory cgroup the limit is RLIMIT_AS: dd's allocation fails.
            fallback=Fallback(FALLBACK_MEMORY, "nonzero_exit", 1)),
    # The shell's fork fails at the limit (it exits 2); the children it left are the run's
    # to end, by the end-of-run kill.
    RunCase("forkbomb", "a shell forking sleepers until pids 8 refuses", 1,
            _sh('while :; do "$BIN/sleep" 30 & done'), "nonzero_exit", 2, {"pids": 8}),
    RunCase("sleep", "sleep 30, cut at wall_ms 100", 1, ("sleep", "30"), "wall_limit", None,
            {"wall_ms": 100}),
    RunCase("files_in", "a file given inline (`files[].content`), read back by cat", 3,
            ("cat", "/tmp/in"), extra=_inline,
            check=_stdout(lambda seq, ctx: f"inline {seq}\n")),
    RunCase("cached_in", "a file of the file cache bound in (`files[].file_id`), cat", 3,
            ("cat", "/tmp/in"), extra=_cached,
            check=_stdout(lambda seq, ctx: CACHED_CONTENT.decode())),
    RunCase("copy_out", "a file written by the run, returned by `copy_out`", 2, _WRITE_OUT,
            extra=_copy_out, check=_copied),
    RunCase("copy_out_cached", "a file written by the run, stored by `copy_out_cached`", 1,
            _WRITE_OUT, extra=_copy_out_cached, check=_stored),
    SessionCase("session", "a session: create, exec (stdin echoed), delete", 1),
    PullCase("pull", "a pull of the image the soak runs (present: the tag asked again)", 1),
)


def schedule(runs: int, seed: int) -> list[Case]:
    """`runs` cases in the mix's proportions, in an order fixed by `seed`."""
    cycle = [c for c in MIX for _ in range(c.weight)]
    plan = [cycle[i % len(cycle)] for i in range(runs)]
    random.Random(seed).shuffle(plan)
    return plan


async def _setup(ctx: Context, path: str, expected: int, schema: ReplyType, what: str,
                 body: Any = None, data: bytes | None = None) -> dict[str, Any]:
    doc = await _call(ctx, "POST", path, expected, schema, what, body, data)
    if isinstance(doc, Outcome):
        raise SoakSetupError(doc.error)
    return doc


async def prepare(http: aiohttp.ClientSession, url: str, image: str) -> Context:
    """Pull the image and store the cached file: what every request of the mix relies on.
    A failure here stops the soak before it begins (its message says which step)."""
    probe = Context(http, url, image, "", "")
    pulled = await _setup(probe, "/v1/images/pull", 200, IMAGE, "the first pull",
                          {"reference": image})
    stored = await _setup(probe, "/v1/files", 201, CACHED_FILE, "storing the cached file",
                          data=CACHED_CONTENT)
    if stored["id"] != file_id(CACHED_CONTENT):
        raise SoakSetupError(f"the file cache stored the file as {stored['id']}, expected "
                             f"{file_id(CACHED_CONTENT)}")
    return Context(http, url, image, str(pulled["digest"]), str(stored["id"]))


class SoakSetupError(RuntimeError):
    """The soak could not begin: the image could not be pulled, or the file stored."""
