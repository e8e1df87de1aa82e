"""The HTTP layer's own profile (`python -m loadtest.api --profile`): what one warm run
(POST /v1/runs of busybox `true`, one client, keep-alive; per policy asked) costs in each layer
of the service, in µs of the service's CPU per run.

py-spy samples the service process from outside (`record --format raw`, every thread, idle
samples left out) while the runs go one at a time. Each sample goes to the layer of its
innermost frame that names one (LAYERS, first match from the leaf up: a call from the
handler into aiohttp is aiohttp's, one into the engine is the engine's); a layer's share
of the samples times the service's CPU per run (psutil, the same window) is its µs per run.
C functions have no frame of their own: orjson's time is its caller's, so `parse_json`'s
own samples are the decode and `json_response`'s the encode. py-spy reads the stacks
without stopping the service (--nonblocking: stopping it for each sample made the runs
4x slower on this VM); a stack read while it changes can mix two, so a layer's figure is
good to a few µs. The runs/s with and without py-spy are printed beside the table.

py-spy is not a dependency of sandboxd: `pip install py-spy` (scripts/benchmarks.sh does).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from loadtest.baseline import BenchError

RATE_HZ = 997  # prime: no lockstep with any periodic work in the service
ATTACH_S = 1.0
STOP_TIMEOUT_S = 60.0
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Layer:
    name: str
    files: tuple[str, ...] = ()        # a frame in a file whose path contains one of these
    functions: tuple[str, ...] = ()    # or, with `files`, only these functions of them


# First match from the leaf frame up. Worker threads are told apart first (WORKER).
LAYERS = (
    Layer("logging", ("logging/",)),
    # msgspec decodes and checks a run body in one C call, made from service/schemas.py.
    Layer("body validation (service/schemas.py)",
          ("service/schemas.py", "service/bodies.py", "sandbox/validation.py")),
    Layer("JSON decode (orjson, in parse_json)", ("service/api/__init__.py",), ("parse_json",)),
    Layer("JSON encode (orjson, in json_response)", ("service/api/__init__.py",),
          ("json_response",)),
    Layer("admission", ("service/admission.py",)),
    Layer("auth", ("service/auth.py",)),
    Layer("metrics", ("service/metrics.py",)),
    Layer("middlewares (errors, browser checks)", ("service/errors.py", "service/app.py")),
    Layer("handler (service/api, streaming)", ("service/api/", "service/streaming.py")),
    Layer("engine + runtime (sandbox/)", ("sandbox/",)),
    Layer("aiohttp (HTTP parse, routing, response write)", ("aiohttp/", "multidict/", "yarl/")),
)
WORKER = "worker threads"
LOOP = "event loop and the rest (asyncio, selectors, stdlib)"
# Leaf frames that are a system call's time in the kernel, named apart within their layer:
# on 2 cores a send also runs the receiver's side of loopback TCP or of the unix socket,
# and often yields the core to the woken reader.
KERNEL = {
    ("write", "asyncio/selector_events.py"): "socket send (kernel)",
    ("send_fds", "socket.py"): "socket send with descriptors (kernel)",
    ("_read_ready__data_received", "asyncio/selector_events.py"): "socket receive (kernel)",
    ("recv_fds", "socket.py"): "socket receive (kernel)",
    ("_read_from_self", "asyncio/selector_events.py"): "self-pipe wake-up (kernel)",
    ("submit", "concurrent/futures/thread.py"): "thread pool hand-off (wakes a worker)",
}


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame of one raw py-spy stack, root first."""
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part.strip())
        if m:
            # py-spy 0.4 names a method by its qualified name (EpollSelector.select); the
            # tables here name the function alone, as py-spy 0.3 did.
            out.append((m["function"].rpartition(".")[2], m["file"]))
    return out


# Leaf frames that are waits py-spy does not see as idle (a C call blocking in the kernel).
# The housekeeping thread waits in its queue's get, a C call: its own frame is the leaf.
IDLE = (("_worker", "concurrent/futures/thread.py"), ("select", "selectors.py"),
        ("_serve", "sandbox/runtime/housekeeping.py"))


def classify(stack: str) -> str | None:
    """The layer of one sample, or None when it is a thread waiting for work."""
    frames = _frames(stack)
    if not frames or any(frames[-1][0] == f and frames[-1][1].endswith(path)
                         for f, path in IDLE):
        return None
    if any(f == "_worker" and "concurrent/futures/thread.py" in path for f, path in frames):
        ours = [f"{f} ({path.rpartition('sandbox/')[2]})" for f, path in frames
                if "sandbox/" in path]
        return f"{WORKER}: {ours[-1]}" if ours else WORKER
    kernel = next((what for (f, path), what in KERNEL.items()
                   if frames[-1][0] == f and frames[-1][1].endswith(path)), None)
    name = next((layer.name for function, path in reversed(frames) for layer in LAYERS
                 if any(p in path for p in layer.files)
                 and (not layer.functions or function in layer.functions)), LOOP)
    return f"{name}: {kernel}" if kernel else name


def shares(raw: str) -> tuple[Counter[str], int]:
    """Samples per layer of a `py-spy record --format raw` output, and their total."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        layer = classify(stack) if stack and n.isdigit() else None
        if layer is not None:
            counts[layer] += int(n)
    return counts, sum(counts.values())


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _tree_cpu_s(pid: int) -> float:
    """CPU of every process below `pid` (spawner, inits, and the runs they reaped)."""
    total = 0.0
    for p in psutil.Process(pid).children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def py_spy() -> str:
    """py-spy from this venv, or else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise BenchError(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
    return found


Runs = Callable[[int], Awaitable[float]]   # n sequential runs -> elapsed seconds


async def profile(pid: int, runs: Runs, n: int, raw_out: Path | None = None) -> dict[str, Any]:
    """n sequential warm runs (`runs`) under py-spy, and the service's CPU per layer;
    py-spy's raw stacks are copied to `raw_out` when given."""
    spy = py_spy()
    with tempfile.TemporaryDirectory(prefix="sandboxd-profile-") as tmp:
        out = Path(tmp) / "raw.txt"
        proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ),
                                 "--nonblocking", "--format", "raw", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(ATTACH_S)
            if proc.poll() is not None:
                raise BenchError(f"py-spy could not attach to the service (pid {pid}): "
                                 f"{proc.stderr.read().decode(errors='replace')[-500:]}"
                                 if proc.stderr else "py-spy ended at once")
            service, tree, client = psutil.Process(pid), _tree_cpu_s(pid), psutil.Process()
            cpu0, client0 = _cpu_s(service), _cpu_s(client)
            elapsed = await runs(n)
            cpu = _cpu_s(service) - cpu0
            tree = _tree_cpu_s(pid) - tree
            client_cpu = _cpu_s(client) - client0
        finally:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output and ends
            proc.wait(STOP_TIMEOUT_S)
        raw = out.read_text()
    if raw_out is not None:
        raw_out.write_text(raw)
    counts, total = shares(raw)
    if total == 0:
        raise BenchError("py-spy took no sample of the service")
    per_run_us = cpu / n * 1e6
    layers = {name: round(per_run_us * c / total, 1) for name, c in counts.most_common()}
    return {"runs": n, "samples": total, "rate_hz": RATE_HZ,
            "runs_per_s_profiled": round(n / elapsed, 1),
            "service_cpu_us_per_run": round(per_run_us, 1),
            "layers_us_per_run": layers,
            "spawner_inits_runs_cpu_us_per_run": round(tree / n * 1e6, 1),
            "client_cpu_us_per_run": round(client_cpu / n * 1e6, 1),
            "wall_us_per_run_profiled": round(elapsed / n * 1e6, 1)}


def table(p: dict[str, Any], runs_per_s: float) -> str:
    lines = [f"the service's CPU per warm run, by layer (py-spy, {p['samples']} samples of "
             f"{p['runs']} sequential runs; {p['runs_per_s_profiled']} runs/s profiled, "
             f"{runs_per_s} without py-spy)",
             f"{'layer':<56} {'us/run':>8} {'share':>7}"]
    total = p["service_cpu_us_per_run"]
    for name, us in p["layers_us_per_run"].items():
        lines.append(f"{name:<56} {us:8.1f} {us / total:7.1%}")
    lines += [f"{'service CPU per run (all threads)':<56} {total:8.1f}",
              f"{'spawner, inits and the runs (outside the service)':<56} "
              f"{p['spawner_inits_runs_cpu_us_per_run']:8.1f}",
              f"{'the client (this process)':<56} {p['client_cpu_us_per_run']:8.1f}",
              f"{'wall per run, profiled':<56} {p['wall_us_per_run_profiled']:8.1f}"]
    return "\n".join(lines)
