"""The peers' runs of one workload: the command line of each request for bwrap, crun, runc
and podman, with what it leaves behind removed (see peers.py)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from loadtest.http import oci
from loadtest.http.targets import Invocation, SpawnTarget, write_files
from loadtest.http.workloads import Workload
from sandbox.runtime import syscalls

UNIFIED = "/sys/fs/cgroup/unified"
_ids = itertools.count()


@dataclass(frozen=True)
class PeerEnv:
    """What every peer's runs share: the busybox rootfs (read-only inside), a directory
    for their state (bundles, runtime state, podman's store; removed by the caller), and
    where to find the peers' binaries (default $PATH)."""

    root: Path
    work: Path
    search_path: str | None = None


def inside_env(w: Workload) -> dict[str, str]:
    """The environment the sandboxed run gets (PATH, BIN, TMPDIR), taken from its request."""
    env: dict[str, str] = w.run_body("", 0)["env"]
    return env


def cgroup_hybrid() -> bool:
    """A cgroup2 mount at /sys/fs/cgroup/unified with a controller: crun 1.8 refuses it."""
    try:
        with open("/proc/self/mounts") as f:
            mounted = any(line.split()[1:3] == [UNIFIED, "cgroup2"] for line in f)
        return mounted and bool(Path(UNIFIED, "cgroup.controllers").read_text().split())
    except OSError:
        return False


class PeerTarget(SpawnTarget):
    """One peer's runs of one workload; its files and state live under a directory of its
    own in the env's work directory, removed on exit with everything its runs left."""

    binaries: tuple[str, ...] = ()

    def __init__(self, env: PeerEnv, bins: dict[str, str], workload: Workload, workers: int,
                 timeout_s: float | None) -> None:
        super().__init__(workload, workers, timeout_s)
        self.env, self.bins = env, bins
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.side}-{workload.name}-", dir=env.work))
        files = self.dir / "files"
        files.mkdir()
        self.binds = [(host, inside) for inside, host in write_files(workload, files)]
        self.inside = inside_env(workload)
        self.tag = f"loadtest-{os.getpid()}-{next(_ids)}"

    def close(self) -> None:
        """Remove what runs left behind (after failures, each run's cleanup already ran)."""

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await super().__aexit__(exc_type, exc, tb)
        try:
            self.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Bwrap(PeerTarget):
    side = "bwrap"
    binaries = ("bwrap",)

    def invocation(self, seq: int) -> Invocation:
        argv = [self.bins["bwrap"], "--unshare-all", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--ro-bind", str(self.env.root), "/", "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/tmp"]
        for host, inside in self.binds:
            argv += ["--ro-bind", str(host), inside]
        # bwrap passes its own environment on, and finds the command through its PATH.
        return Invocation(argv[0], [*argv, "--chdir", "/", "--", *self.workload.command],
                          self.inside)


class Runc(PeerTarget):
    """`runc run` of a bundle written for the workload, a new container id per request,
    state under a private --root; a failed run's container is deleted by force."""

    side = "runc"
    binaries = ("runc",)

    def __init__(self, env: PeerEnv, bins: dict[str, str], workload: Workload, workers: int,
                 timeout_s: float | None) -> None:
        super().__init__(env, bins, workload, workers, timeout_s)
        self.state = self.dir / "state"
        self.bundle = oci.write(oci.Bundle(env.root, self.workload.command, self.inside,
                                           self.binds, self._host_ids()), self.dir / "bundle")

    def _host_ids(self) -> tuple[int, int] | None:
        return None if os.geteuid() == 0 else (os.getuid(), os.getgid())

    def _wrap(self, argv: list[str]) -> list[str]:
        return argv

    def _runtime(self, *args: str) -> list[str]:
        return self._wrap([self.bins[self.binaries[0]], "--root", str(self.state), *args])

    def invocation(self, seq: int) -> Invocation:
        cid = f"{self.tag}-{seq}-{next(_ids)}"
        argv = self._runtime("run", "--bundle", str(self.bundle), cid)
        return Invocation(argv[0], argv, dict(os.environ),
                          cleanup=self._runtime("delete", "--force", cid))

    def close(self) -> None:
        if self.state.is_dir():
            for cid in os.listdir(self.state):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _quiet(self._runtime("delete", "--force", cid))


class Crun(Runc):
    """As runc; on a hybrid cgroup layout inside `unshare -m` (with -r as an ordinary
    user: then the bundle's user namespace maps container root to that namespace's root,
    the user itself) where a tmpfs hides the cgroup2 mount crun refuses."""

    side = "crun"
    binaries = ("crun",)

    def __init__(self, env: PeerEnv, bins: dict[str, str], workload: Workload, workers: int,
                 timeout_s: float | None) -> None:
        self.hybrid = "unshare" in bins
        super().__init__(env, bins, workload, workers, timeout_s)

    def _host_ids(self) -> tuple[int, int] | None:
        if self.hybrid and os.geteuid() != 0:
            return (0, 0)
        return super()._host_ids()

    def _wrap(self, argv: list[str]) -> list[str]:
        if not self.hybrid:
            return argv
        root = ["-r"] if os.geteuid() != 0 else []
        return [self.bins["unshare"], "-m", *root, "--", self.bins["sh"], "-c",
                f'mount -t tmpfs none {UNIFIED} && exec "$@"', "crun-unified-hidden", *argv]


class Podman(PeerTarget):
    """`podman run --rm` of the rootfs (--rootfs), with a store, runroot and tmpdir of its
    own (and XDG_RUNTIME_DIR when rootless), in a short temporary path: podman refuses a
    runroot over 50 characters."""

    side = "podman"
    binaries = ("podman",)

    def __init__(self, env: PeerEnv, bins: dict[str, str], workload: Workload, workers: int,
                 timeout_s: float | None) -> None:
        super().__init__(env, bins, workload, workers, timeout_s)
        self.store = Path(tempfile.mkdtemp(prefix="ltpodman-"))
        store = self.store
        self.tmp = store / "tmp"
        self.host_env = dict(os.environ)
        if os.geteuid() != 0:
            xdg = store / "xdg"
            xdg.mkdir(mode=0o700)
            self.host_env["XDG_RUNTIME_DIR"] = str(xdg)
        self.globals = [bins["podman"], "--root", str(store / "root"), "--runroot",
                        str(store / "run"), "--tmpdir", str(self.tmp), "--storage-driver",
                        "overlay", "--cgroup-manager=cgroupfs", "--events-backend=file"]
        if cgroup_hybrid():
            self.globals += ["--runtime", "runc"]

    def invocation(self, seq: int) -> Invocation:
        name = f"{self.tag}-{seq}-{next(_ids)}"
        argv = [*self.globals, "run", "--rm", "--name", name, "--network", "none",
                "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges",
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
        if self.workload.stdin is not None:
            argv.append("-i")
        for k, v in self.inside.items():
            argv += ["--env", f"{k}={v}"]
        for host, inside in self.binds:
            argv += ["-v", f"{host}:{inside}:ro"]
        argv += ["--rootfs", str(self.env.root), *self.workload.command]
        return Invocation(argv[0], argv, self.host_env,
                          cleanup=[*self.globals, "rm", "--force", "--time", "0", name])

    def close(self) -> None:
        # Rootless podman keeps a pause process holding its user namespace: it goes too.
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.tmp / "pause.pid").read_text()), signal.SIGKILL)
        _end_stragglers(str(self.store))
        _unmount_under(self.store)
        shutil.rmtree(self.store, ignore_errors=True)


def _unmount_under(top: Path) -> None:
    """A root podman's overlay driver mounts its store's overlay directory on itself, and
    leaves it: unmounted, deepest first, before the store is removed."""
    prefix = f"{top}/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        with contextlib.suppress(OSError):
            syscalls.umount2(point, syscalls.MNT_DETACH)


def _end_stragglers(mark: str, grace_s: float = 5.0) -> None:
    """conmon outlives `podman run --rm` to run its cleanup: give the processes that name
    this store a moment to finish, then kill what is left."""
    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and mark in " ".join(
                    p.info["cmdline"] or ()):
                found.append(p)
        return found

    deadline = time.monotonic() + grace_s
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _quiet(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, timeout=60, check=False)


TARGETS: dict[str, type[PeerTarget]] = {t.side: t for t in (Bwrap, Crun, Runc, Podman)}
