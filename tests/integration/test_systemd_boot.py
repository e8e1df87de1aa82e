"""`sandboxd setup --user NAME --systemd` and `--user-unit` under a running systemd.

PID 1 of this machine is not systemd, so the test boots one: Debian's systemd as PID 1 of
its own pid, mount, cgroup, network, uts and ipc namespaces, the way a container manager
runs it (systemd.io/CONTAINER_INTERFACE): `container=` in its environment; a root that is
this host's root filesystem read-only with /etc, /home and /root as overlays whose writes
stay in memory; /run, /tmp, /var and /dev of its own; a cgroup subtree of its own in every
hierarchy this host mounts, shown to it as the whole tree through the cgroup namespace; and
an /etc/systemd/system that holds only this test's boot target and masks, so no unit of
the host is started or changed. In there the test does what an admin does: `sandboxd setup`
as root, then the API on the default port with the tokens file's token, a run, a drain on
`systemctl stop`, and `--remove`. Everything of it is gone once systemd powers off (its
namespaces die with it); the test removes its cgroups and checks that the host's mounts,
cgroups, accounts and sandboxd files are as before."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import pty
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from sandbox.runtime.cgroups.base import remove_tree
from sandbox.runtime.cgroups.detect import parse_mountinfo
from service import systemd
from testbed import busybox
from tests.service.conftest import ROOT

T = TypeVar("T")
SYSTEMD = Path("/lib/systemd/systemd")
USER = "sbx-boot"   # made inside the container: the host's accounts stay as they are
PORT = 8643         # the config `sandboxd setup` writes; the container has its own network
IMAGE = "local/busybox:1"
# Safety nets only: each wait ends as soon as its condition holds.
BOOT_TIMEOUT_S = 120
READY_TIMEOUT_S = 60
POWEROFF_TIMEOUT_S = 120
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000

# Units of a booted host that have no business in this container: those that would write
# the host kernel's settings (sysctl, binfmt_misc, modules), those of devices and hardware
# (udev, hwdb, debugfs, hugepages), and first-boot chores. Masked in the container's own
# /etc/systemd/system; most are skipped in a container anyway (ConditionVirtualization=,
# a read-only /sys), masking makes sure.
MASKED = (
    "systemd-sysctl.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-modules-load.service",
    "kmod-static-nodes.service", "systemd-udevd.service", "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket", "systemd-udev-trigger.service",
    "systemd-hwdb-update.service", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "sys-kernel-config.mount", "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    "systemd-random-seed.service", "systemd-firstboot.service", "ldconfig.service",
    "systemd-journal-catalog-update.service", "systemd-update-done.service",
    "systemd-machine-id-commit.service", "systemd-repart.service",
    "systemd-remount-fs.service")

# The boot target: the basic system, D-Bus and logind (`loginctl enable-linger` needs both),
# nothing of multi-user.target.
BOOT_TARGET = """\
[Unit]
Description=sandboxd test boot
Requires=basic.target
Wants=dbus.socket systemd-logind.service
After=basic.target systemd-logind.service
AllowIsolate=yes
"""

# What nspawn keeps of root's capabilities (+ NET_ADMIN: the network is the container's
# own): no module loading, no clock, no raw I/O.
CAPABILITIES = (
    "chown,dac_override,dac_read_search,fowner,fsetid,ipc_owner,kill,lease,linux_immutable,"
    "mknod,net_admin,net_bind_service,net_broadcast,net_raw,setfcap,setgid,setpcap,setuid,"
    "sys_admin,sys_boot,sys_chroot,sys_nice,sys_ptrace,sys_resource,sys_tty_config,"
    "audit_write")

# Run by `unshare --mount --pid --fork ...` as the namespaces' first process. Stage 1 joins
# the container's cgroups and makes the cgroup namespace there; stage 2 builds the root
# under a tmpfs of this private mount namespace and becomes systemd.
LAUNCHER = r"""
set -eu
stage=$1; W=$2; shift 2
if [ "$stage" = join ]; then
    for d in "$@"; do echo 0 > "$d/cgroup.procs"; done
    exec unshare --cgroup sh "$W/launcher.sh" root "$W"
fi
M=$W/mnt; R=$M/root; CHECKOUT=$(cat "$W/checkout"); CAPS=$(cat "$W/capabilities")
mount -t tmpfs -o mode=0755 sbx-boot "$M"
mkdir "$R" "$M/upper" "$M/work"
mount --bind / "$R"
mount -o remount,bind,ro "$R"
for d in etc home root; do
    mkdir "$M/upper/$d" "$M/work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$M/upper/$d,workdir=$M/work/$d" "$R/$d"
done
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/var"
mkdir "$R/var/lib" "$R/var/log" "$R/var/cache" "$R/var/spool" "$R/var/tmp"
chmod 1777 "$R/var/tmp"
# The checkout (its venv runs the service), wherever it lies, read-only: after the tmpfs
# mounts, which would hide a checkout below /tmp, /var or /run (a CI's clone).
mkdir -p -m 0755 "$R$CHECKOUT"
mount --bind "$CHECKOUT" "$R$CHECKOUT"
mount -o remount,bind,ro "$R$CHECKOUT"
ln -s /run "$R/var/run"
ln -s /run/lock "$R/var/lock"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
# Read-only while systemd boots: PID 1 raises fs.file-max and fs.nr_open, which are the
# host's. The test lifts it once booted (see `lift_proc_sys`).
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
# The host's hierarchies at the same places; through the cgroup namespace each shows the
# container's subtree as its root. A tmpfs holds them unless cgroup2 is /sys/fs/cgroup.
C=$R/sys/fs/cgroup
grep -q '^\. ' "$W/cgroups" || mount -t tmpfs -o mode=0755,nosuid,nodev,noexec tmpfs "$C"
while read -r rel fstype opts; do
    mkdir -p "$C/$rel"
    mount -t "$fstype" -o "nosuid,nodev,noexec$opts" cgroup "$C/$rel"
done < "$W/cgroups"
grep -q '^\. ' "$W/cgroups" || mount -o remount,ro,nosuid,nodev,noexec "$C"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
touch "$R/dev/console"
mount --bind "$(cat "$W/console")" "$R/dev/console"
mkdir "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$R/dev/${i#*:}"; done
# systemd's configuration is this test's own: no unit the host enabled is seen.
for d in system user; do mount -t tmpfs -o mode=0755 tmpfs "$R/etc/systemd/$d"; done
cp -a "$W/units/." "$R/etc/systemd/system/"
: > "$R/etc/fstab"
: > "$R/etc/machine-id"
echo sbx-boot > "$R/etc/hostname"
hostname sbx-boot
mkdir "$R/run/host-root"
cd "$R"
pivot_root . run/host-root
umount -l /run/host-root
rmdir /run/host-root
mount --make-rshared /
exec setpriv --bounding-set="-all,+$CAPS" \
    env -i container=sandboxd-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=sbx-boot.target
"""


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup mount of this host and the container's subtree in it."""

    rel: str        # its mount point under /sys/fs/cgroup ("." for a cgroup2-only host)
    fstype: str
    options: str    # the mount options naming its controllers (",memory", ",none,name=systemd")
    key: frozenset[str]  # its controllers as /proc/self/cgroup names them (empty for cgroup2)
    path: Path      # the container's root cgroup in it, on this host


def _hierarchies(name: str) -> list[Hierarchy]:
    """Every cgroup mount of this host, each with a child of this process's cgroup there."""
    known = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()
             if not line.startswith("#")}
    own: dict[frozenset[str], str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        own[frozenset(ctls.split(",")) if ctls else frozenset()] = path
    out = []
    for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        if m.fstype == "cgroup2":
            key, options = frozenset[str](), ""
        else:
            names = sorted(o for o in m.options if o.startswith("name="))
            key = frozenset(sorted(m.options & known) + names)
            options = "," + ",".join(sorted(m.options & known) or ["none", *names])
            if names and m.options & known:
                options += "," + ",".join(names)
        if key not in own or not m.path.is_relative_to("/sys/fs/cgroup"):
            continue
        rel = own[key]
        if m.root != "/":  # a mount of a subtree (this host is a container itself)
            rel = rel.removeprefix(m.root)
        out.append(Hierarchy(str(m.path.relative_to("/sys/fs/cgroup")), m.fstype, options,
                             key, m.path / rel.lstrip("/") / name))
    return out


def _enter_net(pid: int) -> None:
    """As a thread pool's initializer: this thread's sockets are in pid's network."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the container's network")
    finally:
        os.close(fd)


@dataclass
class Booted:
    """A systemd running as PID 1 of its own namespaces; `pid` is that PID 1 on this host."""

    pid: int
    hierarchies: list[Hierarchy]
    console: Path
    net: ThreadPoolExecutor

    @property
    def root(self) -> Path:
        """The container's root directory, seen from this host."""
        return Path(f"/proc/{self.pid}/root")

    def sh(self, *argv: str, check: bool = True, cwd: str = "/",
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """argv as root in every namespace of the container, with a root shell's clean
        environment (what an admin's `sudo` gives)."""
        done = subprocess.run(
            ["nsenter", "--all", f"--target={self.pid}", f"--wd={cwd}", "env", "-i",
             f"PATH={PATH}", "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8",
             *argv], capture_output=True, text=True, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}\n{self.diagnosis()}")
        return done

    def diagnosis(self) -> str:
        journal = subprocess.run(
            ["nsenter", "--all", f"--target={self.pid}", "journalctl", "--no-pager", "-n",
             "80"], capture_output=True, text=True, check=False).stdout
        return f"-- console:\n{self.console.read_text(errors='replace')[-3000:]}\n" \
               f"-- journal:\n{journal}"

    def in_net(self, fn: Callable[[], T]) -> Future[T]:
        """fn() on a thread whose network is the container's."""
        return self.net.submit(fn)


def _pump(master: int, log: Path) -> None:
    with open(log, "wb") as out:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                return
            if not data:
                return
            out.write(data)
            out.flush()


def _host_state(name: str) -> dict[str, Any]:
    """What the container must leave as it is: this process's mounts; no cgroup of the
    container (`name`) or of its service's user; the files `sandboxd setup` writes, the
    host's sysctls PID 1 raises at boot, and no account of the container's."""
    files = {}
    for f in ("/etc/systemd/system/sandboxd.service", "/etc/sandboxd/sandboxd.toml",
              "/etc/sandboxd/tokens.toml"):
        try:
            files[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        except FileNotFoundError:
            files[f] = None
    # os.walk: other programs make and remove cgroups meanwhile (a walk must not fail on one
    # that went away).
    cgroups = sorted(os.path.join(d, sub) for h in _hierarchies(name)
                     for d, subs, _ in os.walk(Path("/sys/fs/cgroup") / h.rel)
                     for sub in subs if sub in (name, f"sandboxd-{USER}"))
    accounts = [f for f in ("/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid")
                if Path(f).exists() and f"\n{USER}:" in "\n" + Path(f).read_text()]
    return {"files": files, "cgroups": cgroups, "accounts": accounts,
            "mounts": sorted(line.split(" ")[4] for line in
                             Path("/proc/self/mountinfo").read_text().splitlines()),
            "/var/lib/sandboxd": Path("/var/lib/sandboxd").exists(),
            "sysctl": [Path(f"/proc/sys/fs/{k}").read_text() for k in ("file-max", "nr_open")]}


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[Booted]:
    if os.geteuid() != 0:
        pytest.skip("booting systemd in namespaces of its own (mounts, cgroups) is root's")
    missing = [p for p in ("unshare", "nsenter", "setpriv", "pivot_root", "journalctl")
               if shutil.which(p) is None]
    if not SYSTEMD.exists() or missing:
        pytest.skip(f"needs Debian's systemd and util-linux ({missing or SYSTEMD} missing)")
    if subprocess.run(["runuser", "-u", "nobody", "--", "test", "-x", systemd.executable()[0]],
                      check=False).returncode != 0:
        pytest.skip(f"other users cannot run {systemd.executable()[0]}: clone the checkout "
                    "where they can")
    work = Path(tempfile.mkdtemp(prefix="sbx-boot-"))
    name = work.name
    made: list[Path] = []
    master, slave = pty.openpty()
    console = tmp_path / "console.log"
    pump = threading.Thread(target=_pump, args=(master, console), daemon=True)
    pump.start()
    launcher: subprocess.Popen[bytes] | None = None
    booted: Booted | None = None
    pidns = None
    powered_off = True
    try:
        before = _host_state(name)
        hierarchies = _hierarchies(name)
        (work / "mnt").mkdir()
        (work / "launcher.sh").write_text(LAUNCHER)
        (work / "checkout").write_text(str(ROOT))
        (work / "capabilities").write_text(CAPABILITIES.replace(",", ",+"))
        (work / "console").write_text(os.ttyname(slave))
        (work / "cgroups").write_text("".join(f"{h.rel} {h.fstype} {h.options}\n"
                                              for h in hierarchies))
        units = work / "units"
        units.mkdir()
        (units / "sbx-boot.target").write_text(BOOT_TARGET)
        for unit in MASKED:
            (units / unit).symlink_to("/dev/null")
        for h in hierarchies:
            h.path.mkdir()
            made.append(h.path)
            if "cpuset" in h.key:  # a v1 cpuset takes no process before it has cpus
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (h.path / f).write_text((h.path.parent / f).read_text())
        launcher = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--net", "--uts",
             "--ipc", "--propagation", "private", "sh", str(work / "launcher.sh"), "join",
             str(work), *(str(h.path) for h in hierarchies)],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        slave = -1
        pid = _wait_for_systemd(launcher, console)
        pidns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        booted = Booted(pid, hierarchies, console, ThreadPoolExecutor(
            max_workers=2, initializer=_enter_net, initargs=(pid,)))
        state = booted.sh("systemctl", "is-system-running", "--wait", check=False,
                          timeout=BOOT_TIMEOUT_S).stdout.strip()
        failed = booted.sh("systemctl", "--failed", "--no-legend").stdout
        assert state == "running", f"systemd is {state}: {failed}\n{booted.diagnosis()}"
        lift_proc_sys(booted)
        yield booted
    finally:
        if booted is not None:
            booted.net.shutdown()
        if slave >= 0:
            os.close(slave)
        if launcher is not None:
            powered_off = _power_off(launcher)
        pump.join(timeout=10)
        os.close(master)
        for d in reversed(made):
            remove_tree(str(d))
        shutil.rmtree(work)
    assert powered_off, "systemd did not power off: its namespaces were killed"
    assert _host_state(name) == before, "the container left something on this host"
    assert pidns is None or not [p.pid for p in psutil.process_iter() if _pidns(p.pid) == pidns], \
        "processes of the container are left"


def _pidns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def lift_proc_sys(booted: Booted) -> None:
    """Lift the read-only /proc/sys of the boot: each sandbox mounts a /proc of its own in a
    user namespace, which the kernel allows only where a mounted /proc is fully visible
    (nothing mounted over part of it). A container that runs sandboxd must leave /proc
    as it is (podman: --security-opt unmask=ALL)."""
    booted.sh("umount", "--lazy", "/proc/sys")


def _wait_for_systemd(launcher: subprocess.Popen[bytes], console: Path) -> int:
    """The pid of the container's PID 1 once it is systemd and listens."""
    real = os.path.realpath(SYSTEMD)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the container ended ({launcher.returncode}) before systemd "
                                 f"ran:\n{console.read_text(errors='replace')}")
        for child in psutil.Process(launcher.pid).children():
            try:
                if os.path.realpath(f"/proc/{child.pid}/exe") == real and \
                        Path(f"/proc/{child.pid}/root/run/systemd/private").exists():
                    return child.pid
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"systemd did not start in {BOOT_TIMEOUT_S} s:\n"
                         f"{console.read_text(errors='replace')}")


def _power_off(launcher: subprocess.Popen[bytes]) -> bool:
    """systemd's poweroff (SIGRTMIN+4 to PID 1): units stop, then PID 1 ends, which ends its
    pid namespace and, with the last process, its mounts. SIGKILL (and False) if it does
    not."""
    children = psutil.Process(launcher.pid).children() if launcher.poll() is None else []
    for child in children:
        os.kill(child.pid, signal.SIGRTMIN + 4)
    try:
        launcher.wait(timeout=POWEROFF_TIMEOUT_S)
        return True
    except subprocess.TimeoutExpired:
        launcher.kill()  # --kill-child: its PID 1 gets SIGKILL
        launcher.wait()
        return False


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A busybox root filesystem as a tar, for `POST /v1/images/import` (the container has
    no network to a registry)."""
    root = busybox.build_rootfs(tmp_path_factory.mktemp("boot-image") / "rootfs")
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    return tar.read_bytes()


def _account(booted: Booted, user: str) -> tuple[int, Path]:
    """user's uid and home, from the container's own /etc/passwd."""
    for line in (booted.root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), Path(fields[5])
    raise AssertionError(f"no {user} in the container")


def _request(token: str, method: str, path: str, body: bytes | None = None,
             kind: str = "application/json") -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", body, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": kind})
    with urllib.request.urlopen(request, timeout=READY_TIMEOUT_S) as r:
        return json.load(r)


def _ready() -> bool:
    for path in ("/healthz", "/readyz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as r:
                if r.status != 200:
                    return False
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Unit:
    """sandboxd's unit in the container, as a system or a user service."""

    booted: Booted
    systemctl: tuple[str, ...]

    def show(self, prop: str) -> str:
        return self.booted.sh(*self.systemctl, "show", "--value", "-p", prop,
                              systemd.UNIT).stdout.strip()

    def wait_state(self, *states: str) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (state := self.show("ActiveState")) not in states:
            assert time.monotonic() < deadline, f"{systemd.UNIT} stays {state}:\n" \
                                                f"{self.booted.diagnosis()}"
            time.sleep(0.1)
        return state

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.booted.in_net(_ready).result():
            state = self.show("ActiveState")
            assert state in ("activating", "active") and time.monotonic() < deadline, \
                f"{systemd.UNIT} is {state}, not ready:\n{self.booted.diagnosis()}"
            time.sleep(0.1)


def _procs(top: Path) -> set[int]:
    """Every process in cgroup `top` and below (the service makes and removes cgroups there
    meanwhile: one that went away holds none)."""
    found: set[int] = set()
    for d, _, _ in os.walk(top):
        with contextlib.suppress(FileNotFoundError):
            found.update(int(pid) for pid in Path(d, "cgroup.procs").read_text().split())
    return found


def _cgroup_of(pid: int) -> dict[frozenset[str], str]:
    """pid's cgroup in each hierarchy, as this host names it."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        out[frozenset(ctls.split(",")) if ctls else frozenset()] = path
    return out


# A run that waits for SIGUSR1 (sent once the service drains), then says so. `wait` returns
# on a trapped signal, so the trap is set once the sleep exists.
DRAIN = "trap 'echo drained; exit 0' USR1; sleep 600 & wait"


@pytest.mark.parametrize("scope", ["--systemd", "--user-unit"])
def test_setup_under_a_running_systemd_serves_drains_on_stop_and_removes(
        booted: Booted, image_tar: bytes, scope: str) -> None:
    per_user = scope == "--user-unit"
    if per_user and shutil.which("dbus-daemon") is None:
        pytest.skip("`loginctl enable-linger` talks to logind over D-Bus: install dbus")
    booted.sh("useradd", "--create-home", "--shell", "/bin/sh", USER)
    uid, home = _account(booted, USER)
    unit = Unit(booted, ("systemctl", "--user", f"--machine={USER}@") if per_user
                else ("systemctl",))
    setup = (*systemd.executable(), "setup", "--user", USER, scope)
    said = booted.sh(*setup, cwd=str(ROOT)).stdout
    assert f"started {systemd.UNIT}" in said, said
    assert booted.sh(*unit.systemctl, "is-enabled", systemd.UNIT).stdout.strip() == "enabled"
    unit.wait_ready()

    tokens = (home / ".config/sandboxd" if per_user else Path("/etc/sandboxd")) / "tokens.toml"
    token = tomllib.loads((booted.root / tokens.relative_to("/")).read_text())["tokens"][0]["token"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        booted.in_net(lambda: _request("not-a-token", "GET", "/v1/images")).result()
    assert refused.value.code == 401
    booted.in_net(lambda: _request(token, "POST", f"/v1/images/import?reference={IMAGE}",
                                   image_tar, "application/x-tar")).result()
    _assert_serves(booted, token)
    # A daemon-reload (each package upgrade does one) leaves sandboxd's cgroups alone: the
    # next run, on the container the last one left warm, has all of them.
    booted.sh("systemctl", "daemon-reload")
    _assert_serves(booted, token)
    # What a boot does on cgroup v1: the cgroups `sandboxd setup` delegated are gone (cgroupfs
    # keeps nothing), then the system unit starts, or lingering starts the user's manager.
    started_at_boot = f"user@{uid}.service" if per_user else systemd.UNIT
    booted.sh("systemctl", "stop", started_at_boot)
    for h in booted.hierarchies:
        remove_tree(str(h.path / f"sandboxd-{USER}"))
    booted.sh("systemctl", "start", started_at_boot)
    unit.wait_ready()
    _assert_serves(booted, token)

    # Delegate=yes: systemd made the unit's cgroup its user's, in the hierarchies systemd
    # tracks processes by (name=systemd, and cgroup2).
    control_group = unit.show("ControlGroup")
    tracking = [h for h in booted.hierarchies if h.key in (frozenset({"name=systemd"}),
                                                          frozenset())]
    for h in tracking:
        assert (h.path / control_group.lstrip("/")).stat().st_uid == uid, (h, control_group)

    draining = booted.in_net(lambda: _request(token, "POST", "/v1/runs", json.dumps(
        {"image": IMAGE, "cmd": ["sh", "-c", DRAIN]}).encode()))
    memory, own = _sandboxd_cgroups(booted, control_group)
    sh = _wait_for_drain_run(booted, own)
    # The run is in the unit's cgroup where systemd tracks it (so a stop reaches it), and
    # in a cgroup the service made for it where the memory controller is (its limits).
    where = _cgroup_of(sh)
    for h in tracking:
        unit_path = "/" + str((h.path / control_group.lstrip("/")).relative_to(
            Path("/sys/fs/cgroup") / h.rel))
        assert where[h.key].startswith(unit_path + "/") or where[h.key] == unit_path, \
            (h.key, where[h.key], unit_path)
    run_memory = Path("/sys/fs/cgroup", memory.rel) / where[memory.key].lstrip("/")
    assert run_memory.is_relative_to(own) and run_memory != own, (run_memory, own)
    assert run_memory.stat().st_uid == uid

    # `systemctl stop`: SIGTERM to sandboxd alone, which stops taking requests and lets the
    # run finish: the run's processes live on until it does.
    booted.sh(*unit.systemctl, "stop", "--no-block", systemd.UNIT)
    assert unit.wait_state("deactivating", "inactive", "failed") == "deactivating"
    assert not booted.in_net(_ready).result()
    assert psutil.pid_exists(sh)
    os.kill(sh, signal.SIGUSR1)
    drained = draining.result(timeout=READY_TIMEOUT_S)
    assert (drained["stdout"], drained["exit_code"]) == ("drained\n", 0), drained
    assert unit.wait_state("inactive", "failed") == "inactive", booted.diagnosis()
    assert unit.show("Result") == "success"
    for h in tracking:
        assert _procs(h.path / control_group.lstrip("/")) == set()
    assert _procs(own) == set()
    for h in booted.hierarchies:
        assert _procs(h.path / f"sandboxd-{USER}") == set()

    said = booted.sh(*setup, "--remove", cwd=str(ROOT)).stdout
    assert "removed" in said
    assert unit.show("LoadState") == "not-found", booted.diagnosis()
    assert not (booted.root / tokens.relative_to("/")).exists()
    assert not [h.path / f"sandboxd-{USER}" for h in booted.hierarchies
                if (h.path / f"sandboxd-{USER}").exists()]


def _assert_serves(booted: Booted, token: str) -> None:
    """A run answers, with nothing to warn about (a cgroup it could not have, say)."""
    served = booted.in_net(lambda: _request(token, "POST", "/v1/runs", json.dumps(
        {"image": IMAGE, "cmd": ["echo", "served"]}).encode())).result()
    assert (served["stdout"], served["exit_code"], served["warnings"]) == ("served\n", 0, []), \
        json.dumps(served)


def _sandboxd_cgroups(booted: Booted, control_group: str) -> tuple[Hierarchy, Path]:
    """The hierarchy of the memory controller, and the cgroup (on this host) below which the
    service makes its runs' there: on cgroup v1 the one `sandboxd setup` delegated at the
    top, on v2 one below the unit's own."""
    v1 = [h for h in booted.hierarchies if h.key == frozenset({"memory"})]
    if v1:
        return v1[0], v1[0].path / f"sandboxd-{USER}"
    v2 = next(h for h in booted.hierarchies if h.key == frozenset())
    return v2, v2.path / control_group.lstrip("/") / f"sandboxd-{USER}"


def _wait_for_drain_run(booted: Booted, top: Path) -> int:
    """The pid (on this host) of DRAIN's shell once its trap is set (its sleep runs)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for pid in _procs(top):
            try:
                process = psutil.Process(pid)
                if process.cmdline()[:2] == ["sleep", "600"]:
                    return process.ppid()
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"the run did not start:\n{booted.diagnosis()}")
