"""The service side: loopback checks, /metrics snapshots, and `--spawn`'s own sandboxd.

`spawned` starts a throwaway loopback registry holding a busybox image, and a gcc image when
asked (pushed with the image API, as `python -m testbed.demo` does), and `sandboxd serve` on a free
loopback port with an empty state directory; both are stopped and the directory removed
whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from testbed import busybox
from testbed.demoimages import TarImage, gcc_rootfs, push_images, write_tar
from testbed.ports import die_with_parent, free_port, stop_process
from testbed.registry import start_registry

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# Counters whose change over a phase is reported; the rest are shown as read.
KEPT = ("sandboxd_runs_total", "sandboxd_pool_hits_total", "sandboxd_pool_misses_total",
        "sandboxd_pool_idle", "sandboxd_live_containers", "sandboxd_http_requests_total",
        "sandboxd_run_setup_seconds_sum", "sandboxd_run_setup_seconds_count",
        "sandboxd_run_seconds_sum", "sandboxd_run_seconds_count", "sandboxd_pulls_total")


class LoadTestError(RuntimeError):
    """The load test cannot run as asked; the message says what to change."""


def add_target_args(ap: argparse.ArgumentParser) -> None:
    """--spawn | --url, --token and --image: where the load goes (every load tool)."""
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true",
                       help="start a registry and sandboxd serve of its own")
    where.add_argument("--url", help="a running sandboxd on loopback, e.g. http://127.0.0.1:8643")
    ap.add_argument("--token", default=os.environ.get("SANDBOXD_TOKEN"),
                    help="API token (default $SANDBOXD_TOKEN)")
    ap.add_argument("--image", help="with --url: a busybox image reference the service can "
                    "pull (its /bin has the busybox applets)")


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a spawned service and registry are stopped."""
    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, terminate)


def check_loopback(url: str) -> str:
    """The URL, if it is http(s) to a loopback host; a load test targets this machine only."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise LoadTestError(f"--url {url!r}: expected http://127.0.0.1:PORT")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadTestError(f"--url {url!r}: the load test targets loopback only (127.0.0.1, "
                            "::1 or localhost); run it on the service's machine")
    return url.rstrip("/")


def parse_metrics(text: str) -> dict[str, float]:
    """The KEPT series of a Prometheus text exposition, as 'name{labels}' -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{", 1)[0] in KEPT:
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 6)
            for k in sorted(set(before) | set(after))
            if after.get(k, 0.0) != before.get(k, 0.0)}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _tar(build: Callable[[Path], Path], work: Path, name: str) -> Path:
    tar = write_tar(build(work / name), work / f"{name}.tar.gz")
    shutil.rmtree(work / name)
    return tar


def _push(work: Path, registry_host: str, compiler: bool,
          programs: tuple[Path, ...]) -> tuple[str, str | None]:
    """The busybox image's reference (`programs` in its /bin), and the compiler image's
    when asked (its 28 MB tar takes seconds to build and push, so only runs that compile
    pay for it)."""
    def rootfs(dest: Path) -> Path:
        root = busybox.build_rootfs(dest)
        for program in programs:
            shutil.copy2(program, root / "bin" / program.name)
        return root

    busybox_ref = f"{registry_host}/loadtest/busybox:1"
    images = [TarImage(_tar(rootfs, work, "busybox"), busybox_ref, ["sh"], {"PATH": "/bin"})]
    gcc_ref = f"{registry_host}/loadtest/gcc:12" if compiler else None
    if gcc_ref is not None:
        images.append(TarImage(_tar(gcc_rootfs, work, "gcc"), gcc_ref, ["gcc", "--version"],
                               {"PATH": "/usr/bin:/bin"}))
    push_images(work / "builder", images)
    return busybox_ref, gcc_ref


@dataclass(frozen=True)
class Spawned:
    url: str
    image: str
    log: Path
    pid: int
    compiler_image: str | None = None    # with compiler=True: gcc 12 (testbed.demoimages)


@contextlib.contextmanager
def spawned(pool_idle: int, *, min_idle: int = 0, compiler: bool = False,
            config: str = "", code: Path | None = None,
            programs: tuple[Path, ...] = ()) -> Iterator[Spawned]:
    """A registry with a busybox image (`programs` added to its /bin; and a gcc image
    with `compiler`) and a `sandboxd serve` using it, then nothing left. `config`: more
    TOML for its config file. `code`: the checkout whose service runs (`python -m` takes
    its modules from the working directory first); this interpreter's by default."""
    work = Path(tempfile.mkdtemp(prefix="sandboxd-loadtest-"))
    try:
        with start_registry(work / "registry") as registry:
            image, compiler_image = _push(work, registry.host, compiler, programs)
            port = free_port()
            config_file = work / "sandboxd.toml"
            # Enough warm containers for every concurrent request of one workload.
            config_file.write_text(f"[pools]\nmax_idle = {pool_idle}\nmin_idle = {min_idle}\n"
                                   + config)
            log = work / "sandboxd.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(port), "--state-dir", str(work / "state"),
                     "--config", str(config_file)],
                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, cwd=code)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while not _ready(url):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise LoadTestError("sandboxd serve did not start; its log:\n"
                                            + log.read_text(errors="replace")[-3000:])
                    time.sleep(0.1)
                yield Spawned(url, image, log, proc.pid, compiler_image)
            finally:
                stop_process(proc, STOP_TIMEOUT_S)
    finally:
        shutil.rmtree(work, ignore_errors=True)
