"""One load test: for each workload, a warm-up, the sandboxed phase over HTTP and the bare
phase beside it, in the same loop and bounds; then the report's figures and ratios."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.baseline import Loops, fastest, measure
from loadtest.http import peers as peer_mod
from loadtest.http.driver import Phase, Send, closed_loop, open_loop
from loadtest.http.judge import JudgeBareTarget, JudgeHttpTarget, times_from_now
from loadtest.http.service import LoadTestError, metrics_delta, parse_metrics
from loadtest.http.stats import Recorder, summary
from loadtest.http.targets import BareEnv, BareTarget, HttpTarget, SpawnTarget
from loadtest.http.workloads import Workload
from testbed import busybox


@dataclass(frozen=True)
class Plan:
    url: str
    token: str | None
    image: str
    workloads: tuple[Workload, ...]
    concurrency: int = 4                 # closed loop: workers; open loop: ignored
    rate: float | None = None            # open loop when set: requests per second
    requests: int | None = None          # per workload and side, or
    duration_s: float | None = None      # per workload and side
    warmup: int = 8
    max_inflight: int = 256              # open loop
    timeout_s: float = 120.0
    bare: bool = True
    progress: bool = True
    compiler_image: str | None = None    # for workloads that compile (judge-c)
    peers: tuple[str, ...] = ()          # peer phases after the bare one: bwrap, crun, ...
    peer_path: str | None = None         # where the peers' binaries are (default $PATH)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def connections(self) -> int:
        return self.max_inflight if self.open_loop else self.concurrency


async def _metrics(url: str, token: str | None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as s, \
            s.get(url + "/metrics") as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"GET /metrics answered {resp.status}: {text[:200]}")
    return parse_metrics(text)


def _progress(label: str, target: str) -> Callable[[Recorder, float], None]:
    tty = sys.stderr.isatty()

    def tick(rec: Recorder, elapsed: float) -> None:
        p50 = rec.latency.get_value_at_percentile(50) / 1000 if rec.count else 0.0
        line = (f"{label}: {rec.count}{target} done, {rec.count / elapsed:7.1f}/s, "
                f"p50 {p50:7.2f} ms, {rec.failed} errors, {elapsed:5.1f} s")
        print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n",
              file=sys.stderr, flush=True)

    return tick


async def _phase(plan: Plan, send: Send, label: str) -> Phase:
    target = (f"/{plan.requests}" if plan.requests else
              f" (of {plan.duration_s:g} s)")
    tick = _progress(label, target) if plan.progress else None
    if plan.open_loop:
        phase = await open_loop(send, plan.rate or 0.0, requests=plan.requests,
                                duration_s=plan.duration_s, max_inflight=plan.max_inflight,
                                tick=tick)
    else:
        phase = await closed_loop(send, plan.concurrency, requests=plan.requests,
                                  duration_s=plan.duration_s, tick=tick)
    if tick is not None:
        tick(phase.recorder, phase.elapsed_s)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    return phase


async def _warm(plan: Plan, send: Callable[[int], Awaitable[Any]]) -> None:
    """Untimed: the first run pulls the image, the next ones fill the warm pool."""
    if plan.warmup:
        await closed_loop(send, min(plan.concurrency, plan.warmup), requests=plan.warmup)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def overhead(sandboxed: dict[str, Any], bare: dict[str, Any]) -> dict[str, float | None]:
    """sandboxed / bare: latency above 1 is slower, throughput below 1 is fewer runs/s."""
    s, b = sandboxed["latency_ms"], bare["latency_ms"]
    return {"p50": _ratio(s.get("p50"), b.get("p50")), "p99": _ratio(s.get("p99"), b.get("p99")),
            "throughput": _ratio(sandboxed["throughput_per_s"], bare["throughput_per_s"])}


def vs_fastest(side: dict[str, Any], tight: Loops) -> dict[str, float | None]:
    """A side's figures / the fastest tight bare loop's: latency above 1 is slower,
    throughput below 1 is fewer runs/s."""
    s = side["latency_ms"]
    return {"p50": _ratio(s.get("p50"), fastest(tight).latency_ms["p50"]),
            "p99": _ratio(s.get("p99"), fastest(tight, "p99").latency_ms["p99"]),
            "throughput": _ratio(side["throughput_per_s"],
                                 fastest(tight, "runs_per_s").runs_per_s)}


def _http_target(plan: Plan, w: Workload) -> HttpTarget:
    if w.compiler:
        if plan.compiler_image is None:
            raise LoadTestError(f"workload {w.name} needs a compiler image: pass "
                                "--compiler-image REF with --url, or use --spawn")
        return JudgeHttpTarget(plan.url, plan.token, plan.image, plan.compiler_image, w,
                               plan.connections, plan.timeout_s)
    return HttpTarget(plan.url, plan.token, plan.image, w, plan.connections, plan.timeout_s)


def _bare_target(plan: Plan, w: Workload, env: BareEnv) -> SpawnTarget:
    return (JudgeBareTarget if w.compiler else BareTarget)(env, w, plan.connections)


async def _peer_phases(plan: Plan, w: Workload, ready: dict[str, peer_mod.Peer | str],
                       bare: dict[str, Any] | None) -> dict[str, Any]:
    """Each peer's phase of the workload, in the same loop and bounds as the bare one."""
    out: dict[str, Any] = {}
    for name, peer in ready.items():
        if isinstance(peer, str):
            out[name] = {"skipped": peer}
        elif w.compiler:
            out[name] = {"skipped": f"{w.name} needs a compiler image; peers run busybox"}
        else:
            async with peer.target(w, plan.connections, plan.timeout_s) as t:
                await _warm(plan, t.send)
                phase = await _phase(plan, t.send, f"{w.name} {name}")
            out[name] = summary(phase.recorder, phase.elapsed_s, plan.open_loop)
            if bare is not None:
                out[name]["overhead"] = overhead(out[name], bare)
    return out


async def run_workload(plan: Plan, w: Workload, bare_env: BareEnv | None,
                       peers: dict[str, peer_mod.Peer | str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"measures": w.measures, "policy": w.policy, "script": w.script}
    async with _http_target(plan, w) as http:
        await _warm(plan, http.send)
        times = times_from_now(http)
        before = await _metrics(plan.url, plan.token)
        phase = await _phase(plan, http.send, f"{w.name} sandboxed")
        after = await _metrics(plan.url, plan.token)
    out["sandboxed"] = summary(phase.recorder, phase.elapsed_s, plan.open_loop)
    delta = metrics_delta(before, after)
    out["sandboxed"]["service_metrics_delta"] = delta
    # Runs executing at once on average, by the service's own clock (Little's law again).
    out["sandboxed"]["running_mean"] = round(delta.get("sandboxd_run_seconds_sum", 0.0)
                                             / phase.elapsed_s, 2)
    if times is not None:
        out["sandboxed"]["submission"] = times.summary()
    tight: Loops | None = None
    if bare_env is not None:
        async with _bare_target(plan, w, bare_env) as bare:
            await _warm(plan, bare.send)
            times = times_from_now(bare)
            phase = await _phase(plan, bare.send, f"{w.name} bare")
            command = bare.tight(bare_env.scratch) if isinstance(bare, BareTarget) else None
        out["bare"] = summary(phase.recorder, phase.elapsed_s, plan.open_loop)
        if times is not None:
            out["bare"]["submission"] = times.summary()
        out["overhead"] = overhead(out["sandboxed"], out["bare"])
        if command is not None and not w.compiler:
            # As many runs as the bare phase made, at the loop's concurrency (the open loop's
            # floor: one at a time).
            at_once = 1 if plan.open_loop else plan.concurrency
            tight = measure(command, max(out["bare"]["requests"], at_once), at_once,
                            plan.warmup)
            out["tight_bare"] = {m: loop.figures() for m, loop in tight.items()}
    if peers:
        out["peers"] = await _peer_phases(plan, w, peers, out.get("bare"))
    if tight is not None:
        for s in (out["sandboxed"], out["bare"], *out.get("peers", {}).values()):
            if "latency_ms" in s:
                s["vs_fastest_bare"] = vs_fastest(s, tight)
    return out


def _scratch(base: Path) -> Path:
    """A tmpfs directory for the bare runs' files, as /tmp is in the container."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="sandboxd-loadtest-", dir=shm))
    return base / "scratch"


async def run(plan: Plan) -> dict[str, Any]:
    report: dict[str, Any] = {
        "tool": "python -m loadtest", "url": plan.url, "image": plan.image,
        "mode": "open" if plan.open_loop else "closed",
        "concurrency": None if plan.open_loop else plan.concurrency,
        "rate_per_s": plan.rate, "max_inflight": plan.max_inflight if plan.open_loop else None,
        "requests": plan.requests, "duration_s": plan.duration_s, "warmup": plan.warmup,
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "metrics_before": await _metrics(plan.url, plan.token),
        "workloads": {},
    }
    base = Path(tempfile.mkdtemp(prefix="sandboxd-loadtest-bare-"))
    scratch = _scratch(base)
    try:
        bare_env = None
        root = busybox.build_rootfs(base / "rootfs") if plan.bare or plan.peers else None
        if plan.bare and root is not None:
            scratch.mkdir(exist_ok=True)
            bare_env = BareEnv(root, scratch)
        ready: dict[str, peer_mod.Peer | str] = {}
        if root is not None and plan.peers:
            (base / "peers").mkdir()
            env = peer_mod.PeerEnv(root, base / "peers", plan.peer_path)
            ready = {name: await peer_mod.ready(name, env) for name in plan.peers}
            report["peers"] = {n: {"skipped": p} if isinstance(p, str) else {"command": p.how}
                               for n, p in ready.items()}
        for w in plan.workloads:
            report["workloads"][w.name] = await run_workload(plan, w, bare_env, ready)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    report["metrics_after"] = await _metrics(plan.url, plan.token)
    report["metrics_delta"] = metrics_delta(report["metrics_before"], report["metrics_after"])
    return report
