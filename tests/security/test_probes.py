"""Security probes run inside real containers (security.md §7).

Each probe in probes/*.c tries one attack and judges its own outcome: it prints one line,
"SAFE: ..." with exit 0, or "UNSAFE: ..." with exit 1 ("ERROR: ..." with exit 2 when it could
not run). The tests here only add what a probe cannot see from inside: that the run was killed
by SIGSYS, that the environment is exactly the declared one, that nothing outlives a run.

Fixtures (from tests/security/conftest.py):
    probe_run(name, *args, env=None) -> RunResult   a reset container, judge and default
    probe_exec(container, name, *args) -> RunResult                     in a given container
    container_factory() -> Container                                    a fresh probe container
    host_listener: (port, abstract_name)       the host listens on 127.0.0.1:port and @name
    host_marker: Path                          a host file that must stay invisible
    setuid_probe_path: str                     in-container path of a setuid-root probe copy
RunResult: status, exit_code, signal, stdout (bytes), stderr (bytes).
host_listener and host_marker are used as values; a factory (callable) form is accepted too.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path, PurePosixPath

import pytest

SIGSYS = int(signal.SIGSYS)

# Probes whose own SAFE/UNSAFE verdict is the whole check (see the comment atop each .c file).
SELF_JUDGING = [
    "userns",  # unshare/clone(CLONE_NEWUSER) fail
    "newns",  # unshare/clone with every other CLONE_NEW* flag fail
    "clone3",  # clone3 -> ENOSYS; fork and pthread_create still work
    "mount",  # mount, umount2, pivot_root, chroot, setns, new mount API fail
    "ptrace",  # ptrace/process_vm_readv/kcmp/pidfd_getfd on a sibling and on pid 1 fail
    "initmem",  # init's mem, environ, maps, fds, root, exe are out of reach
    "iouring",  # io_uring_setup fails
    "keyring",  # keyctl, add_key, request_key fail
    "bpf_perf",  # bpf, perf_event_open, userfaultfd fail
    "sockets",  # only AF_UNIX, AF_INET, AF_INET6, AF_NETLINK: the rest EAFNOSUPPORT
    "procmask",  # masked /proc files are empty, read-only ones cannot be opened for writing
    "kernelops",  # kexec, modules, reboot, swap, acct, clocks, iopl/ioperm, personality fail
    "cgroupfs",  # cgroup mounts fail (also after unshare), no writable cgroupfs
    "devices",  # no dangerous device node opens, no block device in /dev
    "fds",  # only fds 0-2, cwd inside the root
    "caps",  # no capabilities, NoNewPrivs 1, Seccomp 2, privileged operations fail
    "tiocsti",  # TIOCSTI (also with bit 32 set) and TIOCLINUX fail
]

# Names any minimal root filesystem may have at its top level (the probe root from
# testbed.busybox also has /work); a host entry outside this set must not be visible inside.
COMMON_TOP_LEVEL = {
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt",
    "opt", "probes", "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var", "work",
}  # fmt: skip

# Accounts a stock image's /etc/passwd may share with the host's.
COMMON_ACCOUNTS = {
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "operator", "adm",
    "shutdown", "halt", "ftp", "nogroup", "users", "staff", "wheel",
}  # fmt: skip

HOST_SOCKETS = [
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/run/dbus/system_bus_socket",
]


def fixture_value(fixture):
    return fixture() if callable(fixture) else fixture


def _clip(data: bytes, limit: int = 4000) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more]"


def describe(r) -> str:
    return (
        f"status={r.status} exit_code={r.exit_code} signal={r.signal}\n"
        f"stdout: {_clip(r.stdout)}\nstderr: {_clip(r.stderr)}"
    )


def assert_safe(r, what: str) -> None:
    assert r.status == "ok" and r.stdout.startswith(b"SAFE"), (
        f"probe {what} did not report SAFE:\n{describe(r)}"
    )


def parse_procs(stdout: bytes) -> tuple[dict[int, str], int | None]:
    """Lines "PID <n> <comm>" and "SELF <n>" of the procs probe."""
    procs: dict[int, str] = {}
    self_pid = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "PID":
            procs[int(parts[1])] = parts[2]
        elif len(parts) == 2 and parts[0] == "SELF":
            self_pid = int(parts[1])
    return procs, self_pid


def host_only_top_level() -> list[str]:
    return sorted(name for name in os.listdir("/") if name not in COMMON_TOP_LEVEL)


def host_account_tokens() -> list[str]:
    """PATH=TOKEN arguments: a host-specific account name ("name:") in passwd/group/shadow.

    A readable image file of the same name is fine as long as it lacks that account.
    """
    args = []
    for path in ("/etc/passwd", "/etc/group", "/etc/shadow"):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        names = [line.split(":", 1)[0] for line in lines if ":" in line]
        distinctive = [n for n in names if n and n not in COMMON_ACCOUNTS]
        if distinctive:
            args.append(f"{path}={distinctive[-1]}:")
    return args


def probe_name_for(path: str) -> str:
    """probe_run takes a name under /probes; any other in-container path is passed whole."""
    p = PurePosixPath(path)
    return p.name if str(p.parent) == "/probes" else path


@pytest.mark.parametrize("name", SELF_JUDGING)
def test_probe_reports_safe(probe_run, name):
    assert_safe(probe_run(name), name)


def test_int80_compat_syscall_is_killed(probe_run):
    r = probe_run("int80")
    assert r.status == "syscall_blocked" and r.signal == SIGSYS, (
        f"an i386 syscall via int $0x80 must kill the run with SIGSYS:\n{describe(r)}"
    )
    assert b"UNSAFE" not in r.stdout, describe(r)


def test_x32_syscall_is_killed(probe_run):
    r = probe_run("int80", "x32")
    assert r.status == "syscall_blocked" and r.signal == SIGSYS, (
        f"an x32 syscall (nr | 0x40000000) must kill the run with SIGSYS:\n{describe(r)}"
    )
    assert b"UNSAFE" not in r.stdout, describe(r)


def test_host_files_are_invisible(probe_run, host_marker):
    marker = Path(fixture_value(host_marker))
    assert marker.is_file(), f"host marker {marker} does not exist on the host"
    args = [str(marker), str(Path(__file__).resolve())]  # and this checkout
    if len(marker.parent.parts) >= 3:  # its own temp dir, not /tmp itself
        args.append(str(marker.parent))
    args += host_account_tokens()
    args += [p for p in HOST_SOCKETS if os.path.exists(p)]
    args += [f"--top={name}" for name in host_only_top_level()]
    r = probe_run("hostfiles", *args)
    assert_safe(r, f"hostfiles {' '.join(args)}")


def test_host_network_is_unreachable(probe_run, host_listener):
    port, name = fixture_value(host_listener)
    r = probe_run("network", str(port), name)
    assert_safe(r, f"network {port} @{name}")


def test_setuid_binary_gains_nothing(probe_run, setuid_probe_path):
    r = probe_run(probe_name_for(setuid_probe_path))
    assert_safe(r, f"setuid ({setuid_probe_path})")
    assert b"suid=yes" in r.stdout, (
        f"{setuid_probe_path} does not carry the setuid bit, so the check proved nothing:\n"
        f"{describe(r)}"
    )


def test_environment_is_exactly_the_declared_one(probe_run):
    declared = {
        "PATH": "/bin:/usr/bin",
        "SBX_PROBE_ONE": "1",
        "SBX_PROBE_TWO": "two words = and more",
    }
    r = probe_run("env", env=declared)
    assert r.status == "ok", describe(r)
    got = r.stdout.decode("utf-8", "replace").splitlines()
    want = sorted(f"ENV {k}={v}" for k, v in declared.items())
    assert got == want, f"environment differs from the declared one:\nwant {want}\n{describe(r)}"


def test_fresh_container_runs_only_init_and_the_probe(probe_run):
    r = probe_run("procs")
    assert r.status == "ok", describe(r)
    procs, self_pid = parse_procs(r.stdout)
    assert self_pid in procs and 1 in procs, describe(r)
    others = {pid: comm for pid, comm in procs.items() if pid not in (1, self_pid)}
    assert not others, f"unexpected processes in a fresh container: {others}\n{describe(r)}"


def test_daemon_does_not_outlive_its_run(probe_exec, container_factory):
    container = container_factory()
    first = probe_exec(container, "daemon")
    assert first.status == "ok" and first.stdout.startswith(b"SAFE"), (
        "the daemon probe's run must end when its main process exits, even though a setsid "
        f"grandchild keeps stdout open:\n{describe(first)}"
    )
    m = re.search(rb"pid=(\d+)", first.stdout)
    daemon_pid = int(m.group(1)) if m else None

    second = probe_exec(container, "procs")
    assert second.status == "ok", describe(second)
    procs, self_pid = parse_procs(second.stdout)
    assert self_pid in procs and 1 in procs, describe(second)
    others = {pid: comm for pid, comm in procs.items() if pid not in (1, self_pid)}
    assert not others, (
        f"processes survived the previous run (the daemon was pid {daemon_pid}): {others}\n"
        f"{describe(second)}"
    )
