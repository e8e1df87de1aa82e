"""`python -m testbed.demo` (scripts/demo.sh): the whole path a user takes, on this
machine, in about half a minute.

1. Two images are made from what Debian installed here (busybox-static; python3.11 and
   its standard library) and pushed to a throwaway local registry (Debian's
   docker-registry on a loopback port).
2. `sandboxd serve` starts on another loopback port with an empty state directory, as
   whoever runs the demo (an ordinary user: rootless is the product).
3. Untrusted programs go through the REST API with the Python client: the service pulls
   the image on first use, runs each program in a container, and reports its verdict and
   figures. Then the same program again, from the warm pool.

Everything it started is stopped and removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sbx import ApiError, RunResult, SyncClient
from testbed import busybox
from testbed.demoimages import TarImage, push_images, python_rootfs, write_tar
from testbed.ports import free_port, stop_process
from testbed.registry import start_registry

HELLO = """
import os, platform, socket
print("hello from", socket.gethostname(), "as uid", os.getuid(), "on", platform.python_version())
print("2**100 =", 2**100)
"""
ESCAPES = """
import os, socket
for what, attempt in [
    ("read /etc/shadow", lambda: open("/etc/shadow").read()),
    ("reach the network", lambda: socket.create_connection(("1.1.1.1", 53), timeout=1)),
    ("write outside /tmp", lambda: open("/usr/pwned", "w")),
    ("kill init", lambda: os.kill(1, 9)),
    ("see processes", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit())),
]:
    try:
        print(f"{what}: {attempt()}")
    except Exception as e:
        print(f"{what}: refused ({type(e).__name__})")
"""
FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
MEMORY_HOG = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
SPIN = "while True:\n    pass\n"


def _figures(r: RunResult) -> str:
    mem = f"{r.memory_peak_bytes / 2**20:.1f} MiB" if r.memory_peak_bytes else "-"
    return (f"status={r.status} exit={r.exit_code} cpu={r.cpu_ms:.1f} ms "
            f"wall={r.wall_ms:.1f} ms peak memory={mem} setup={r.setup_ms:.2f} ms "
            f"warm={'yes' if r.pool_hit else 'no'}")


def _ready(client: SyncClient) -> bool:
    try:
        return client.ready()
    except ApiError as e:
        if e.status == 0:  # not listening yet
            return False
        raise


@contextlib.contextmanager
def _service(state: Path, port: int, log: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host",
                                 "127.0.0.1", "--port", str(port), "--state-dir", str(state)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        with SyncClient(url) as client:
            deadline = time.monotonic() + 60
            while not _ready(client):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sandboxd serve did not start; its log:\n"
                                       f"{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, 30)


def _push_images(work: Path, registry_host: str) -> tuple[str, str]:
    """The demo images, built here and pushed with the image API (the registry client)."""
    busybox_ref, python_ref = (f"{registry_host}/demo/busybox:1",
                               f"{registry_host}/demo/python:3.11")
    push_images(work / "builder", [
        TarImage(write_tar(busybox.build_rootfs(work / "busybox"), work / "busybox.tar.gz"),
                 busybox_ref, ["sh"], {"PATH": "/bin"}),
        TarImage(write_tar(python_rootfs(work / "python"), work / "python.tar.gz"),
                 python_ref, ["python3"],
                 {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}),
    ])
    for name in ("busybox", "python"):
        shutil.rmtree(work / name)
    return busybox_ref, python_ref


def run_demo() -> int:
    work = Path(tempfile.mkdtemp(prefix="sandboxd-demo-"))
    try:
        print("== 1. demo images from Debian's packages, pushed to a local registry")
        with start_registry(work / "registry") as registry:
            busybox_ref, python_ref = _push_images(work, registry.host)
            print(f"   {busybox_ref}\n   {python_ref}")
            port = free_port()
            print(f"== 2. sandboxd serve on 127.0.0.1:{port} as uid {os.geteuid()}")
            with _service(work / "state", port, work / "sandboxd.log") as url, \
                    SyncClient(url) as client:
                print("== 3. untrusted code through POST /v1/runs "
                      "(the first run pulls the image)")
                for title, code, policy, limits in (
                        ("hello", HELLO, "judge", {}),
                        ("the same again, warm", HELLO, "judge", {}),
                        ("escape attempts", ESCAPES, "default", {}),
                        ("fork bomb", FORK_BOMB, "judge", {"pids": 32}),
                        ("memory hog", MEMORY_HOG, "judge", {"memory_bytes": 64 << 20}),
                        ("endless loop", SPIN, "judge", {"cpu_ms": 500})):
                    result = client.run(python_ref, ["python3", "-c", code], policy=policy,
                                        limits=limits)
                    print(f"-- {title} ({policy})")
                    out = str(result.stdout).strip() or str(result.stderr).strip()[-300:]
                    for line in out.splitlines()[-6:]:
                        print(f"   | {line}")
                    print(f"   {_figures(result)}")
                shell = client.run(busybox_ref, ["sh", "-c", "echo busybox $(busybox | "
                                                 "head -1 | cut -d' ' -f2) in a container"])
                print(f"-- busybox image: {str(shell.stdout).strip()}\n   {_figures(shell)}")
        print("== done: everything the demo started is stopped and removed")
        return 0
    except (ApiError, RuntimeError, OSError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_demo())
