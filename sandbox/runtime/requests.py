"""What a caller asks the runtime for: a container (ContainerSpec) and a run in it
(ExecRequest), and the checks a run's request passes before anything is made for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.errors import PolicyError
from sandbox.runtime import idmap
from sandbox.runtime.policy import Policy
from sandbox.runtime.profiles import Limits
from sandbox.runtime.pty import TtySize

# Docker's default when an image sets no PATH (moby oci/defaults.go, Linux), and a run's.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The kernel's own bounds (MAX_ARG_STRLEN; ARG_MAX on a default 8 MiB stack is 2 MiB): a
# request past them would only fail at execve, so it is refused before anything is made.
MAX_ARG_BYTES = 128 << 10
MAX_ARGV_ENV_BYTES = 1 << 20


@dataclass(frozen=True)
class ContainerSpec:
    """A container: its layers (lowest first; one directory = a plain root) and policy
    (resolved by the runtime's PolicyRegistry, or the name of a profile to resolve)."""

    layers: tuple[str, ...]
    policy: Policy | str = "default"
    writable: bool | None = None     # None: as the profile says
    hostname: str = "sandbox"
    network: str = "none"            # none, proxy or full (sandbox/runtime/network)


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    cwd: str = "/"
    stdin: bytes | int | None = None   # bytes, a readable fd (not consumed), or /dev/null
    limits: Limits | None = None       # as asked, or as the container's Policy.limits resolved
    uid: int | None = None             # inside the container; default: the mapping's run id
    gid: int | None = None
    # Descriptors a run's 0, 1 or 2 take instead of what the runtime gives them (`stdin`,
    # the output pipes it reads), by number: pipes to other runs (a pipeline). The run
    # takes them: the host's copies are closed once init has its own (or the exec failed),
    # so when the run's processes are gone the other end sees EOF or SIGPIPE. Once the
    # request is given to exec, its caller neither uses nor closes them.
    stdio: dict[int, int] = field(default_factory=dict)
    # A terminal of this size is the run's 0-2 (stderr merged into stdout); `stdin` bytes
    # are typed into it, then end-of-file unless a RunControl feeds it (pty.py).
    tty: TtySize | None = None


def validate(req: ExecRequest, mapping: idmap.IdMapping) -> None:
    """PolicyError, naming the field, for a request no exec could carry out."""
    if not req.argv or not all(isinstance(a, str) for a in req.argv):
        raise PolicyError("argv: give at least the program, as a list of strings")
    if any("\0" in a for a in req.argv):
        raise PolicyError("argv: an argument contains a NUL byte")
    for k, v in req.env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PolicyError("env: names and values must be strings")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise PolicyError(f"env: {k!r} is not a valid variable (no '=', no NUL, not empty)")
    strings = [a.encode() for a in req.argv] + [f"{k}={v}".encode() for k, v in req.env.items()]
    if any(len(b) > MAX_ARG_BYTES for b in strings):
        raise PolicyError(f"argv/env: one string is over {MAX_ARG_BYTES} bytes; pass large "
                          "data through stdin or a file")
    if sum(len(b) + 1 for b in strings) > MAX_ARGV_ENV_BYTES:
        raise PolicyError(f"argv/env: over {MAX_ARGV_ENV_BYTES} bytes in all; pass large "
                          "data through stdin or a file")
    if any(n not in (0, 1, 2) for n in req.stdio):
        raise PolicyError("stdio: only descriptors 0, 1 and 2 of a run can be given")
    if req.tty is not None and (req.stdio or isinstance(req.stdin, int)):
        raise PolicyError("tty: a run with a terminal takes its input through the terminal "
                          "(RunControl.write), not a descriptor of its own")
    if not req.cwd.startswith("/") or "\0" in req.cwd:
        raise PolicyError("cwd: must be an absolute path inside the container")
    for name, value in (("uid", req.uid), ("gid", req.gid)):
        if value is not None:
            mapping.check_run_id(name, value)
