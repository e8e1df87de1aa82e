"""Seccomp profiles: validation, compilation, and the compiled filters on the real kernel.

Behaviour tests fork a child that sets no_new_privs, installs a filter and makes one raw
syscall; the result (or the signal that killed the child) comes back through a pipe. Every
denial is checked against an unfiltered control run, so EPERM is known to come from the filter.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import termios
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import PolicyError
from sandbox.runtime.seccomp import (
    SeccompProfile,
    SeccompProgram,
    builtin_profile_path,
    compile_profile,
    install,
    load_profile,
)
from tests.conftest import shared_dir

try:
    import seccomp
except ImportError:
    import pyseccomp as seccomp

MOBY_PROFILE = shared_dir() / "data/moby-seccomp-default.json"
x86_64_only = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall ABI")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
AF_ALG, AF_VSOCK = 38, 40
TIOCSTI, TIOCLINUX, TIOCGWINSZ, FIONREAD = 0x5412, 0x541C, 0x5413, 0x541B
TIOCGPTN_SIGN_EXTENDED = 0xFFFFFFFF80045430  # how musl passes _IOR('T', 0x30, int)
HIGH_BIT = 1 << 32


def nr(name: str) -> int:
    return int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name))


def syscall(name: str | int, *args: int) -> int:
    """A raw syscall: its result, or -errno."""
    number = nr(name) if isinstance(name, str) else name
    rc = _libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
    return -ctypes.get_errno() if rc == -1 else rc


@dataclass
class Outcome:
    value: int | None = None
    signal: int | None = None
    error: str = ""


def run_child(
    bpf: bytes | None, probe: Callable[[], int], setup: Callable[[], None] | None = None
) -> Outcome:
    """Run probe() in a forked child under `bpf` (None: unfiltered control)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if setup is not None:
                setup()
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
            if bpf is not None:
                install(bpf)
            os.write(w, b"v" + struct.pack("q", probe()))
        except BaseException as exc:
            os.write(w, b"e" + repr(exc).encode()[:500])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Outcome(signal=os.WTERMSIG(status))
    if data[:1] == b"e":
        return Outcome(error=data[1:].decode())
    assert data[:1] == b"v", f"child said nothing (status {status:#x})"
    return Outcome(value=struct.unpack("q", data[1:9])[0])


def value_in_child(bpf: bytes | None, probe: Callable[[], int], **kw: Any) -> int:
    outcome = run_child(bpf, probe, **kw)
    assert outcome.signal is None and not outcome.error, outcome
    assert outcome.value is not None
    return outcome.value


_buffers: list[ctypes.Array[ctypes.c_char]] = []


def _buffer(size: int, data: bytes = b"") -> int:
    """Address of a buffer (zeroed, or starting with `data`) that lives as long as the
    (short-lived) child."""
    _buffers.append(ctypes.create_string_buffer(data, size))
    return ctypes.addressof(_buffers[-1])


def closing(rc: int) -> int:
    """Close a descriptor a probe opened; keep the result."""
    if rc >= 0:
        os.close(rc)
    return rc


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return compile_profile(load_profile(builtin_profile_path("default"))).bpf


@pytest.fixture
def moby() -> SeccompProfile:
    if not MOBY_PROFILE.is_file():
        pytest.skip(f"Docker's profile is not at {MOBY_PROFILE} (test data of the workspace)")
    return load_profile(MOBY_PROFILE)


def minimal(**changes: Any) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {
                "names": ["getpid"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
            }
        ],
    }
    profile.update(changes)
    return profile


def with_rule(**changes: Any) -> dict[str, Any]:
    profile = minimal()
    profile["syscalls"][0].update(changes)
    return profile


def with_arg(**changes: Any) -> dict[str, Any]:
    profile = minimal()
    profile["syscalls"][0]["args"][0].update(changes)
    return profile


# --------------------------------------------------------------------------- loading


def test_builtin_default_profile_loads() -> None:
    path = builtin_profile_path("default")
    profile = load_profile(path)
    assert path.name == "default.json"
    assert profile.name == "default"
    assert profile.default_action == "SCMP_ACT_ERRNO"
    assert profile.default_errno_ret == errno.EPERM
    assert profile.raw["defaultAction"] == "SCMP_ACT_ERRNO"


@pytest.mark.parametrize("name", ["nope", "../default", "Default", ""])
def test_builtin_profile_path_rejects_unknown_names(name: str) -> None:
    with pytest.raises(PolicyError, match="seccomp profile"):
        builtin_profile_path(name)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (with_rule(action="SCMP_ACT_FOO"),
         r"syscalls\[0\]\.action: unknown action 'SCMP_ACT_FOO'; use one of SCMP_ACT_KILL"),
        (with_arg(op="SCMP_CMP_FOO"), r"syscalls\[0\]\.args\[0\]\.op: unknown operator"),
        (with_arg(index=6), r"syscalls\[0\]\.args\[0\]\.index: expected an integer from 0 to 5"),
        (with_arg(value=-1), r"syscalls\[0\]\.args\[0\]\.value"),
        (with_arg(value=2**64), r"syscalls\[0\]\.args\[0\]\.value"),
        (with_arg(value=True), r"syscalls\[0\]\.args\[0\]\.value"),
        (with_arg(valueTwo=1), r"syscalls\[0\]\.args\[0\]\.valueTwo: only SCMP_CMP_MASKED_EQ"),
        (with_arg(op="SCMP_CMP_MASKED_EQ", value=0xF0, valueTwo=0x1),
         r"syscalls\[0\]\.args\[0\]\.valueTwo: .* bits outside the mask"),
        (with_arg(idx=1), r"syscalls\[0\]\.args\[0\]\.idx: unknown field"),
        (with_rule(names=[]), r"syscalls\[0\]\.names: missing"),
        (with_rule(names=None), r"syscalls\[0\]\.names: missing"),
        (with_rule(names="getpid"), r"syscalls\[0\]\.names: expected a list"),
        (with_rule(names=["get pid"]), r"syscalls\[0\]\.names\[0\]"),
        (with_rule(errnoRet=1), r"syscalls\[0\]\.errnoRet: only SCMP_ACT_ERRNO"),
        (with_rule(action="SCMP_ACT_ERRNO", errnoRet=-1), r"syscalls\[0\]\.errnoRet"),
        (with_rule(nmaes=["x"]), r"syscalls\[0\]\.nmaes: unknown field"),
        (with_rule(includes={"minKernel": "4"}), r"syscalls\[0\]\.includes\.minKernel"),
        (with_rule(excludes={"caps": ["SYS_ADMIN"]}), r"syscalls\[0\]\.excludes\.caps\[0\]"),
        (with_rule(includes=[]), r"syscalls\[0\]\.includes: expected an object"),
        (minimal(architectures=["SCMP_ARCH_Z80"]), r"architectures\[0\]: unknown architecture"),
        (minimal(archMap=[{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["x86"]}]),
         r"archMap\[0\]\.subArchitectures\[0\]: unknown architecture 'x86'"),
        (minimal(archMap=[{"subArchitectures": []}]), r"archMap\[0\]\.architecture: missing"),
        (minimal(defaultAction=None), r"defaultAction: missing"),
        (minimal(defaultErrnoRet=5000), r"defaultErrnoRet: expected an integer from 0 to 4095"),
        (minimal(defaultActon="SCMP_ACT_ALLOW"), r"defaultActon: unknown field"),
        (minimal(flags=["SECCOMP_FILTER_FLAG_BOGUS"]), r"flags\[0\]: unknown flag"),
        (minimal(syscalls={"names": ["getpid"]}), r"syscalls: expected a list"),
        (minimal(syscalls=["getpid"]), r"syscalls\[0\]: expected an object"),
    ],
)  # fmt: skip
def test_invalid_profiles_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=r"seccomp profile 'broken': " + message):
        load_profile(raw, name="broken")


def test_profile_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(PolicyError, match="'list': profile: expected an object, got list"):
        load_profile(tmp_path / "list.json")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": ')
    with pytest.raises(PolicyError, match=r"'bad': .*bad\.json is not JSON"):
        load_profile(bad)


def test_docker_legacy_name_field_and_nulls() -> None:
    raw = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": None,
        "syscalls": [{"name": "getpid", "names": None, "action": "SCMP_ACT_ALLOW", "args": None}],
    }
    assert load_profile(raw).syscalls[0].names == ("getpid",)


# --------------------------------------------------------------------------- compiling


def test_docker_profile_compiles_unchanged(moby: SeccompProfile) -> None:
    plain = compile_profile(moby)
    admin = compile_profile(moby, capabilities=frozenset({"CAP_SYS_ADMIN"}))
    for program in (plain, admin):
        assert isinstance(program, SeccompProgram)
        assert program.bpf and len(program.bpf) % 8 == 0
        assert set(program.skipped_syscalls) <= {n for r in moby.syscalls for n in r.names}
    assert plain.bpf != admin.bpf
    assert compile_profile(moby, capabilities=frozenset({"sys_admin"})).bpf == admin.bpf


def test_docker_profile_min_kernel_and_caps(moby: SeccompProfile) -> None:
    # ptrace is allowed from 4.8 on; before that, it takes CAP_SYS_PTRACE.
    old, new = (compile_profile(moby, kernel=k).bpf for k in ((4, 7), (4, 8)))
    assert old != new
    ptrace_cap = compile_profile(moby, kernel=(4, 7), capabilities=frozenset({"CAP_SYS_PTRACE"}))
    assert ptrace_cap.bpf != old


def test_docker_profile_behaviour_depends_on_caps(moby: SeccompProfile) -> None:
    plain = compile_profile(moby).bpf
    admin = compile_profile(moby, capabilities=frozenset({"CAP_SYS_ADMIN"})).bpf
    unshare_user = lambda: syscall("unshare", CLONE_NEWUSER)  # noqa: E731
    assert value_in_child(plain, unshare_user) == -errno.EPERM
    assert value_in_child(admin, unshare_user) == 0
    assert value_in_child(plain, lambda: syscall("clone3", 0, 0)) == -errno.ENOSYS


def test_default_ioctl_rules_spell_out_everything_but_tiocsti_and_tioclinux() -> None:
    profile = load_profile(builtin_profile_path("default"))
    rules = [r for r in profile.syscalls if "ioctl" in r.names]
    assert all(r.action == "SCMP_ACT_ALLOW" and r.args for r in rules)

    def allowed(cmd: int) -> bool:
        return any(all(a.op == "SCMP_CMP_MASKED_EQ" and cmd & a.value == a.value_two
                       for a in r.args) for r in rules)  # fmt: skip

    for denied in (TIOCSTI, TIOCLINUX):
        for high in (0, HIGH_BIT, 0xFFFFFFFF00000000):
            assert not allowed(high | denied)
        for bit in range(32):  # every neighbour of a denied command is allowed
            assert allowed(denied ^ (1 << bit)) or denied ^ (1 << bit) in (TIOCSTI, TIOCLINUX)
    for cmd in range(0x5400, 0x5500):
        assert allowed(cmd) == (cmd not in (TIOCSTI, TIOCLINUX))


def test_compile_is_deterministic() -> None:
    first = compile_profile(load_profile(builtin_profile_path("default")))
    second = compile_profile(load_profile(builtin_profile_path("default")))
    assert first == second
    assert first.name == "default"


def test_unknown_syscalls_are_skipped_and_listed() -> None:
    raw = minimal(syscalls=[{"names": ["getpid", "no_such_call"], "action": "SCMP_ACT_ALLOW"}])
    program = compile_profile(load_profile(raw))
    assert program.skipped_syscalls == ("no_such_call",)
    # A name that exists, but only for architectures this filter does not cover.
    raw["syscalls"][0]["names"].append("socketcall" if nr("socketcall") < 0 else "arch_prctl")
    assert len(compile_profile(load_profile(raw)).skipped_syscalls) == 2


def test_rules_with_the_default_action_are_skipped() -> None:
    base = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": []}
    allow = {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
    same_as_default = {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    with_redundant = compile_profile(load_profile({**base, "syscalls": [allow, same_as_default]}))
    without = compile_profile(load_profile({**base, "syscalls": [allow]}))
    assert with_redundant.bpf == without.bpf


def test_notify_is_refused() -> None:
    raw = minimal(syscalls=[{"names": ["getpid"], "action": "SCMP_ACT_NOTIFY"}])
    profile = load_profile(raw)  # valid OCI, but nothing here would answer the notifications
    with pytest.raises(PolicyError, match=r"syscalls\[0\]\.action: SCMP_ACT_NOTIFY is not"):
        compile_profile(profile)
    excluded = copy.deepcopy(raw)
    excluded["syscalls"][0]["includes"] = {"caps": ["CAP_SYS_ADMIN"]}
    compile_profile(load_profile(excluded))


def test_rule_shadowed_by_an_unconditional_rule_is_refused() -> None:
    raw = minimal(
        syscalls=[
            {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["ioctl"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 1, "value": 0xFFFFFFFF, "valueTwo": TIOCSTI,
                          "op": "SCMP_CMP_MASKED_EQ"}],
            },
        ]
    )  # fmt: skip
    with pytest.raises(PolicyError, match=r"syscalls\[0\] and syscalls\[1\] give ioctl different"):
        compile_profile(load_profile(raw))


def test_two_conditions_on_one_argument_are_refused() -> None:
    raw = with_rule(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_GT"},
                          {"index": 0, "value": 9, "op": "SCMP_CMP_LT"}])  # fmt: skip
    with pytest.raises(PolicyError, match=r"syscalls\[0\]\.args: two conditions on the same"):
        compile_profile(load_profile(raw))


def test_architecture_this_libseccomp_lacks() -> None:
    profile = load_profile(minimal(architectures=["SCMP_ARCH_SHEB"]))
    with pytest.raises(PolicyError, match="SCMP_ARCH_SHEB is not supported by this libseccomp"):
        compile_profile(profile)


def test_install_rejects_what_is_not_a_program() -> None:
    for bad in (b"", b"1234567", bytes(8 * 4097)):
        with pytest.raises(OSError) as info:
            install(bad)
        assert info.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- the default filter

DENIED: dict[str, Callable[[], int]] = {
    "unshare(CLONE_NEWUSER)": lambda: syscall("unshare", CLONE_NEWUSER),
    "clone(CLONE_NEWUSER)": lambda: _clone(CLONE_NEWUSER | signal.SIGCHLD),
    "setns": lambda: syscall("setns", 2**32 - 1, 0),
    "keyctl": lambda: syscall("keyctl", 0x7FFF),
    "add_key": lambda: syscall("add_key", 0, 0, 0, 0, 0),
    "bpf": lambda: syscall("bpf", 0x7FFF, 0, 0),
    "perf_event_open": lambda: syscall("perf_event_open", 0, 0, 2**64 - 1, 2**64 - 1, 0),
    "userfaultfd": lambda: syscall("userfaultfd", 0xFFFF),
    "io_uring_setup": lambda: syscall("io_uring_setup", 1, 0),
    "mount": lambda: syscall("mount", 0, 0, 0, 0, 0),
    "fsopen": lambda: syscall("fsopen", 0, 0),
    "pivot_root": lambda: syscall("pivot_root", 0, 0),
    "chroot": lambda: syscall("chroot", 0),
    "ptrace": lambda: syscall("ptrace", 2, 0, 0, 0),
    "process_vm_readv": lambda: syscall("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0),
    "kcmp": lambda: syscall("kcmp", 0, 0, 0, 0, 0),
    "pidfd_getfd": lambda: syscall("pidfd_getfd", 2**32 - 1, 0, 0),
    "name_to_handle_at": lambda: syscall("name_to_handle_at", 0, 0, 0, 0, 0),
    "reboot": lambda: syscall("reboot", 0, 0, 0, 0),
    "syslog": lambda: syscall("syslog", 10, 0, 0),
    "personality(ADDR_NO_RANDOMIZE)": lambda: syscall("personality", 0x0040000),
}


def _clone(flags: int) -> int:
    rc = syscall("clone", flags, 0, 0, 0, 0)
    if rc == 0:  # the new child, if the filter failed to stop it
        os._exit(0)
    if rc > 0:
        os.waitpid(rc, 0)
    return rc


@x86_64_only
@pytest.mark.parametrize("probe", list(DENIED), ids=list(DENIED))
def test_default_denies(default_bpf: bytes, probe: str) -> None:
    control = value_in_child(None, DENIED[probe])
    if control == -errno.EPERM:
        pytest.skip(f"{probe} fails with EPERM here even without a filter")
    assert value_in_child(default_bpf, DENIED[probe]) == -errno.EPERM


# Families a program may not open: each fails as on a kernel without it (EAFNOSUPPORT), so
# that programs fall back, whatever the high 32 bits of the argument say.
REFUSED_FAMILIES = {
    "AF_UNSPEC": 0, "AF_AX25": 3, "AF_IPX": 4, "AF_APPLETALK": 5, "AF_BRIDGE": 7,
    "AF_X25": 9, "AF_ROSE": 11, "AF_DECnet": 12, "AF_KEY": 15, "AF_PACKET": 17,
    "AF_RDS": 21, "AF_BLUETOOTH": 31, "AF_ALG": AF_ALG, "AF_VSOCK": AF_VSOCK, "AF_XDP": 44,
    "1<<32 | AF_ALG": HIGH_BIT | AF_ALG, "1<<32 | AF_VSOCK": HIGH_BIT | AF_VSOCK,
    "2**32 - 1": 2**32 - 1, "-1": 2**64 - 1,
}  # fmt: skip


@x86_64_only
@pytest.mark.parametrize("call", ["socket", "socketpair"])
@pytest.mark.parametrize("family", list(REFUSED_FAMILIES), ids=list(REFUSED_FAMILIES))
def test_default_refuses_other_socket_families(default_bpf: bytes, call: str,
                                               family: str) -> None:
    value = REFUSED_FAMILIES[family]
    if call == "socket":
        probe = lambda: closing(syscall("socket", value, socket.SOCK_DGRAM, 0))  # noqa: E731
    else:
        probe = lambda: syscall("socketpair", value, socket.SOCK_DGRAM, 0, _buffer(8))  # noqa: E731
    assert value_in_child(default_bpf, probe) == -errno.EAFNOSUPPORT


@x86_64_only
@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6,
                                    socket.AF_NETLINK])  # fmt: skip
def test_default_allows_the_four_socket_families(default_bpf: bytes, family: int) -> None:
    kind = socket.SOCK_RAW if family == socket.AF_NETLINK else socket.SOCK_DGRAM
    control = value_in_child(None, lambda: closing(syscall("socket", family, kind, 0)))
    if control < 0:
        pytest.skip(f"socket({family}) fails here even without a filter ({control})")
    assert value_in_child(default_bpf, lambda: closing(syscall("socket", family, kind, 0))) >= 0
    # socketpair reaches the kernel for each: only AF_UNIX makes pairs.
    pair = value_in_child(default_bpf,
                          lambda: syscall("socketpair", family, socket.SOCK_DGRAM, 0, _buffer(8)))
    assert pair == 0 if family == socket.AF_UNIX else pair in (-errno.EOPNOTSUPP,
                                                               -errno.EPROTONOSUPPORT)


@pytest.fixture
def pty() -> Any:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def _controlling_tty(fd: int) -> Callable[[], None]:
    def setup() -> None:
        os.setsid()
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)

    return setup


@x86_64_only
@pytest.mark.parametrize("cmd", [TIOCSTI, HIGH_BIT | TIOCSTI, 0xFFFFFFFF00000000 | TIOCSTI,
                                 TIOCLINUX, HIGH_BIT | TIOCLINUX])  # fmt: skip
def test_default_denies_tiocsti_whatever_the_high_bits(
    default_bpf: bytes, pty: tuple[int, int], cmd: int
) -> None:
    _, slave = pty
    char = ctypes.c_char(b"x")
    probe = lambda: syscall("ioctl", slave, cmd, ctypes.addressof(char))  # noqa: E731
    setup = _controlling_tty(slave)
    control = value_in_child(None, probe, setup=setup)  # TIOCSTI: 0, or EIO if legacy is off
    if control == -errno.EPERM:
        pytest.skip(f"ioctl {cmd:#x} fails with EPERM here even without a filter")
    assert value_in_child(default_bpf, probe, setup=setup) == -errno.EPERM


@x86_64_only
@pytest.mark.parametrize(
    "probe",
    [
        lambda m, s: syscall("ioctl", s, TIOCGWINSZ, _buffer(8)),
        lambda m, s: syscall("ioctl", m, FIONREAD, _buffer(4)),
        lambda m, s: syscall("ioctl", s, termios.TCGETS, _buffer(64)),
        lambda m, s: syscall("ioctl", m, TIOCGPTN_SIGN_EXTENDED, _buffer(4)),
        lambda m, s: syscall("ioctl", m, HIGH_BIT | TIOCGWINSZ, _buffer(8)),
    ],
    ids=["TIOCGWINSZ", "FIONREAD", "TCGETS", "TIOCGPTN-sign-extended", "TIOCGWINSZ-high-bit"],
)  # fmt: skip
def test_default_allows_other_ioctls(
    default_bpf: bytes, pty: tuple[int, int], probe: Callable[[int, int], int]
) -> None:
    master, slave = pty
    assert value_in_child(default_bpf, lambda: probe(master, slave)) == 0


ALLOWED: dict[str, Callable[[], int]] = {
    "getpid": lambda: syscall("getpid"),
    "socket(AF_INET)": lambda: closing(syscall("socket", socket.AF_INET, socket.SOCK_STREAM, 0)),
    "socket(AF_UNIX)": lambda: closing(syscall("socket", socket.AF_UNIX, socket.SOCK_DGRAM, 0)),
    "socket(AF_NETLINK)": lambda: closing(syscall("socket", socket.AF_NETLINK, socket.SOCK_RAW, 0)),
    "personality(query)": lambda: syscall("personality", 0xFFFFFFFF),
    "memfd_create": lambda: closing(syscall("memfd_create", _buffer(1), 0)),
    "prlimit64": lambda: syscall("prlimit64", 0, 7, 0, _buffer(16)),
    "close_range": lambda: syscall("close_range", 2**31, 2**31, 0),
}


@x86_64_only
@pytest.mark.parametrize("probe", list(ALLOWED), ids=list(ALLOWED))
def test_default_allows(default_bpf: bytes, probe: str) -> None:
    assert value_in_child(default_bpf, ALLOWED[probe]) >= 0


@x86_64_only
def test_default_clone3_is_enosys(default_bpf: bytes) -> None:
    assert value_in_child(default_bpf, lambda: syscall("clone3", 0, 0)) == -errno.ENOSYS


def test_default_allows_fork_and_threads(default_bpf: bytes) -> None:
    def fork_and_thread() -> int:
        import threading

        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        thread.start()
        thread.join()
        return os.waitstatus_to_exitcode(status) * 1000 + len(seen)

    assert value_in_child(default_bpf, fork_and_thread) == 7001


@x86_64_only
def test_x32_syscalls_hit_the_bad_arch_action(default_bpf: bytes) -> None:
    x32_getpid = lambda: syscall(0x40000000 | nr("getpid"))  # noqa: E731
    assert run_child(default_bpf, x32_getpid).signal == signal.SIGSYS


@x86_64_only
def test_int80_i386_syscalls_hit_the_bad_arch_action(default_bpf: bytes) -> None:
    # mov eax, 20 (i386 getpid); int 0x80; ret
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")
    i386_getpid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    control = run_child(None, i386_getpid)
    if control.value is None or control.value <= 0:
        pytest.skip(f"this kernel does not run i386 syscalls ({control})")
    assert run_child(default_bpf, i386_getpid).signal == signal.SIGSYS


def test_kill_process_rule_kills_with_sigsys() -> None:
    raw = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}],
    }
    bpf = compile_profile(load_profile(raw, name="kill")).bpf
    assert run_child(bpf, os.getppid).signal == signal.SIGSYS
    assert value_in_child(bpf, os.getpid) > 0


def test_errno_ret_is_returned() -> None:
    raw = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}],
    }
    bpf = compile_profile(load_profile(raw)).bpf
    assert value_in_child(bpf, lambda: syscall("getppid")) == -42


# --------------------------------------------------------------------------- real programs


def run_program(bpf: bytes, argv: list[str], cwd: Path) -> tuple[int, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.chdir(cwd)
            _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            install(bpf)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        output = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


PYTHON_WORKLOAD = textwrap.dedent(
    """
    import socket, subprocess, sys, threading
    server = socket.create_server(("127.0.0.1", 0))
    def serve():
        conn, _ = server.accept()
        conn.sendall(conn.recv(10).upper())
        conn.close()
    t = threading.Thread(target=serve); t.start()
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(b"ping"); reply = c.recv(10)
    t.join()
    out = subprocess.run(["/bin/sh", "-c", "echo sub"], capture_output=True, text=True).stdout
    print(reply.decode(), out.strip())
    """
)
C_PROGRAM = '#include <stdio.h>\nint main(void) { puts("compiled"); return 0; }\n'
JAVA_PROGRAM = textwrap.dedent(
    """
    public class Main {
        public static void main(String[] args) throws Exception {
            Thread t = new Thread(() -> System.out.println("java thread ok"));
            t.start();
            t.join();
        }
    }
    """
)

PROGRAMS = {
    "busybox-sh-pipeline": (["/usr/bin/busybox", "sh", "-c", "echo hello | cat | tr a-z A-Z"],
                            "HELLO"),
    "python3": (["/usr/bin/python3", "-c", PYTHON_WORKLOAD], "PING sub"),
    "gcc": (["/bin/sh", "-c", "gcc -O1 -o prog prog.c && ./prog"], "compiled"),
    "java": (["/usr/bin/java", "Main.java"], "java thread ok"),
}  # fmt: skip


@pytest.mark.parametrize("program", list(PROGRAMS), ids=list(PROGRAMS))
def test_default_runs_real_programs(default_bpf: bytes, program: str, tmp_path: Path) -> None:
    argv, expected = PROGRAMS[program]
    needed = "gcc" if program == "gcc" else argv[0]
    if shutil.which(needed) is None:
        pytest.skip(f"{needed} is not installed")
    (tmp_path / "prog.c").write_text(C_PROGRAM)
    (tmp_path / "Main.java").write_text(JAVA_PROGRAM)
    unfiltered = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert unfiltered.returncode == 0, unfiltered.stderr
    code, output = run_program(default_bpf, argv, tmp_path)
    assert code == 0, output
    assert expected in output


# --------------------------------------------------------------------------- own process only

RLIMIT_DATA, PRIO_PROCESS, PRIO_PGRP, PRIO_USER = 2, 0, 1, 2
IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP, IOPRIO_WHO_USER = 1, 2, 3


def _rlimit() -> int:
    """This process's own RLIMIT_DATA: setting it on the parent (the test) changes nothing."""
    return _buffer(16, struct.pack("=QQ", *(v & (2**64 - 1) for v in
                                            resource.getrlimit(RLIMIT_DATA))))


def _sched_param() -> int:
    return _buffer(4)


def _sched_attr() -> int:
    # struct sched_attr (version 0, 48 bytes): SCHED_OTHER at this process's own nice.
    return _buffer(56, struct.pack("=IIQiI", 48, 0, 0, os.getpriority(os.PRIO_PROCESS, 0), 0))


def _cpu_mask() -> int:
    return _buffer(128, sum(1 << c for c in os.sched_getaffinity(0)).to_bytes(128, "little"))


def _ioprio() -> int:
    return syscall("ioprio_get", IOPRIO_WHO_PROCESS, 0)


# Run in a forked child of the test, whose ids it shares: each call on the parent (the
# test) would succeed (see the control), and sets what the parent already has.
OWN: dict[str, Callable[[], int]] = {
    "prlimit64(0, set)": lambda: syscall("prlimit64", 0, RLIMIT_DATA, _rlimit(), 0),
    "prlimit64(parent, read)": lambda: syscall("prlimit64", os.getppid(), RLIMIT_DATA, 0,
                                               _buffer(16)),
    "setpriority(PROCESS, 0)": lambda: syscall("setpriority", PRIO_PROCESS, 0, 1),
    "setpriority(PGRP, 0)": lambda: syscall("setpriority", PRIO_PGRP, 0, 2),
    "sched_setscheduler(0)": lambda: syscall("sched_setscheduler", 0, 0, _sched_param()),
    "sched_setparam(0)": lambda: syscall("sched_setparam", 0, _sched_param()),
    "sched_setattr(0)": lambda: syscall("sched_setattr", 0, _sched_attr(), 0),
    "sched_setaffinity(0)": lambda: syscall("sched_setaffinity", 0, 128, _cpu_mask()),
    "ioprio_set(PROCESS, 0)": lambda: syscall("ioprio_set", IOPRIO_WHO_PROCESS, 0, _ioprio()),
    "ioprio_set(PGRP, 0)": lambda: syscall("ioprio_set", IOPRIO_WHO_PGRP, 0, _ioprio()),
}
OTHER: dict[str, Callable[[], int]] = {
    "prlimit64(parent, set)": lambda: syscall("prlimit64", os.getppid(), RLIMIT_DATA,
                                              _rlimit(), 0),
    "prlimit64(1<<32 | parent)": lambda: syscall("prlimit64", HIGH_BIT | os.getppid(),
                                                 RLIMIT_DATA, _rlimit(), 0),
    "setpriority(PROCESS, parent)": lambda: syscall(
        "setpriority", PRIO_PROCESS, os.getppid(), os.getpriority(os.PRIO_PROCESS, 0)),
    "sched_setscheduler(parent)": lambda: syscall("sched_setscheduler", os.getppid(), 0,
                                                  _sched_param()),
    "sched_setparam(parent)": lambda: syscall("sched_setparam", os.getppid(), _sched_param()),
    "sched_setattr(parent)": lambda: syscall("sched_setattr", os.getppid(), _sched_attr(), 0),
    "sched_setaffinity(parent)": lambda: syscall("sched_setaffinity", os.getppid(), 128,
                                                 _cpu_mask()),
    "ioprio_set(PROCESS, parent)": lambda: syscall("ioprio_set", IOPRIO_WHO_PROCESS,
                                                   os.getppid(), _ioprio()),
    "move_pages(parent)": lambda: syscall("move_pages", os.getppid(), 0, 0, 0, 0, 0),
}
# Every process of the caller's user: no control run (it would touch them all).
EVERY_PROCESS_OF_THE_USER: dict[str, Callable[[], int]] = {
    "setpriority(USER, 0)": lambda: syscall("setpriority", PRIO_USER, 0, 0),
    "ioprio_set(USER, 0)": lambda: syscall("ioprio_set", IOPRIO_WHO_USER, 0, 0),
}
ALLOW_ALL_PROFILE = {"defaultAction": "SCMP_ACT_ALLOW"}


@pytest.fixture(scope="module")
def own_only_bpf() -> bytes:
    # Over a profile that allows everything: the refusal does not depend on the profile.
    return compile_profile(load_profile(ALLOW_ALL_PROFILE, name="all"),
                           own_process_only=True).bpf


@x86_64_only
@pytest.mark.parametrize("probe", list(OWN), ids=list(OWN))
def test_own_process_only_allows_calls_on_the_caller(own_only_bpf: bytes, probe: str) -> None:
    control = value_in_child(None, OWN[probe])
    assert value_in_child(own_only_bpf, OWN[probe]) == control


@x86_64_only
@pytest.mark.parametrize("probe", list(OTHER), ids=list(OTHER))
def test_own_process_only_refuses_calls_on_others(own_only_bpf: bytes, probe: str) -> None:
    assert value_in_child(None, OTHER[probe]) != -errno.EPERM  # the kernel would let it
    assert value_in_child(own_only_bpf, OTHER[probe]) == -errno.EPERM


@x86_64_only
@pytest.mark.parametrize("probe", list(EVERY_PROCESS_OF_THE_USER),
                         ids=list(EVERY_PROCESS_OF_THE_USER))
def test_own_process_only_refuses_calls_on_the_whole_user(own_only_bpf: bytes,
                                                          probe: str) -> None:
    assert value_in_child(own_only_bpf, EVERY_PROCESS_OF_THE_USER[probe]) == -errno.EPERM


@pytest.fixture(scope="module")
def default_own_only_bpf() -> bytes:
    return compile_profile(load_profile(builtin_profile_path("default"), name="default"),
                           own_process_only=True).bpf


@x86_64_only
@pytest.mark.parametrize("probe", list(OWN), ids=list(OWN))
def test_own_process_only_over_the_default_policy(default_own_only_bpf: bytes,
                                                  probe: str) -> None:
    assert value_in_child(default_own_only_bpf, OWN[probe]) == value_in_child(None, OWN[probe])


@x86_64_only
@pytest.mark.parametrize("probe", list(OTHER), ids=list(OTHER))
def test_own_process_only_over_the_default_policy_refuses_others(default_own_only_bpf: bytes,
                                                                 probe: str) -> None:
    assert value_in_child(default_own_only_bpf, OTHER[probe]) == -errno.EPERM


def test_own_process_only_refuses_a_profile_with_conditions_of_its_own() -> None:
    raw = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["prlimit64"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 7, "op": "SCMP_CMP_EQ"}]}]}
    compile_profile(load_profile(raw, name="p"))
    with pytest.raises(PolicyError, match=r"syscalls\[0\] allows prlimit64 under conditions"):
        compile_profile(load_profile(raw, name="p"), own_process_only=True)


@x86_64_only
def test_own_process_only_keeps_the_rest_of_the_profile(default_own_only_bpf: bytes) -> None:
    bpf = default_own_only_bpf
    assert value_in_child(bpf, lambda: syscall("keyctl", 0, 0)) == -errno.EPERM
    assert value_in_child(bpf, lambda: syscall("getpid")) > 0
    assert run_child(bpf, lambda: syscall(0x40000000 | nr("getpid"))).signal == signal.SIGSYS


@x86_64_only
def test_syscalls_newer_than_the_profile_get_enosys(default_bpf: bytes) -> None:
    # Numbers above every syscall the profile names: a libc falls back to an older call on
    # ENOSYS but gives up on EPERM.
    for number in (600, 1000):
        assert value_in_child(default_bpf, lambda n=number: syscall(n, 0, 0, 0)) == -errno.ENOSYS
    # A known but denied call keeps its EPERM, and x32 still hits the bad-arch action.
    assert value_in_child(default_bpf, lambda: syscall("keyctl", 0, 0)) == -errno.EPERM
    assert run_child(default_bpf, lambda: syscall(0x40000000 | 1000)).signal == signal.SIGSYS
