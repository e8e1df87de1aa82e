"""The probe `sandboxd info`'s report lacks: a proc mount in a new user and pid namespace,
as a container's init makes one, in a process of its own (`python -m sandbox.doctor.probes`)
that makes the namespaces the way the spawner's helper does (native/helper.c), through
sandbox/runtime/syscalls.py, and exits; everything it made goes with it. A process of its
own because unshare(CLONE_NEWUSER) needs a single-threaded caller. Exit status 0 when it worked;
otherwise the last line on stderr says which call failed (the user namespace and overlayfs
probes are hostinfo's, made with util-linux's unshare, and say only whether).
"""

from __future__ import annotations

import os
import subprocess
import sys

from sandbox.runtime import syscalls as sc

TIMEOUT_S = 10


def _user_namespace(also: int = 0) -> None:
    """A user and mount namespace (and `also`), this user as its root, mounts private."""
    uid, gid = os.geteuid(), os.getegid()
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS | also)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def _proc() -> None:
    """A container init's /proc: a new pid namespace's proc, nosuid, nodev, noexec."""
    _user_namespace(sc.CLONE_NEWPID)
    pid = os.fork()  # the first child is the new namespace's pid 1
    if pid == 0:
        try:
            sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        except OSError as e:
            print(e.strerror, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(1)


def proc_mount() -> str | None:
    """Try it: None when it worked, else what failed."""
    try:
        done = subprocess.run([sys.executable, "-m", "sandbox.doctor.probes"],
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer within {TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def main() -> int:
    try:
        _proc()
    except OSError as e:  # syscalls' errors name the call; open()'s name the file
        print(f"{e.strerror}: {e.filename}" if e.filename else e.strerror, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
