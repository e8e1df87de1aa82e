"""A store on a small filesystem, for tests of a full disk, as root and as an ordinary user.

`run_small(size_mib, directory, "module:function", *args)` runs `function(directory, *args)`
in a Python process of its own whose mount namespace has a tmpfs of `size_mib` MiB at
`directory`, and returns what it returns (JSON). As root the process only unshares its
mount namespace; as an ordinary user it first makes a user namespace that maps its own uid
and gid to themselves (so the store sees the same user as outside, with no subordinate ids),
which gives it the right to mount there. The tmpfs is never visible outside and goes with
the process, whatever happens to the test. A `sandboxd serve` started by the test cannot
see it: tests of the service on a small state directory mount a tmpfs as root instead.

Run as `python -m tests.support.smallfs SIZE_MIB DIR MODULE:FUNCTION [JSON-ARG...]`.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[2]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter(size_mib: int, directory: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        _check(libc.unshare(CLONE_NEWNS), "unshare(mount)")
    else:
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(user, mount)")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0,
                      f"size={size_mib}m,mode=0700".encode()), f"mount a tmpfs on {directory}")


def run_small(size_mib: int, directory: Path, target: str, *args: Any) -> Any:
    """See the module's docstring; a failure in the child is an AssertionError with its
    output."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.smallfs", str(size_mib), str(directory), target,
         *(orjson.dumps(a).decode() for a in args)],
        cwd=ROOT, capture_output=True, timeout=TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{target} on a {size_mib} MiB tmpfs failed "
                             f"({done.returncode}):\n{done.stderr.decode(errors='replace')}")
    return orjson.loads(done.stdout.splitlines()[-1])


def main(argv: list[str]) -> None:
    size_mib, directory, target, *raw = argv
    _enter(int(size_mib), directory)
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    call_args = (Path(directory), *(orjson.loads(a) for a in raw))
    result = asyncio.run(fn(*call_args)) if inspect.iscoroutinefunction(fn) else fn(*call_args)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
