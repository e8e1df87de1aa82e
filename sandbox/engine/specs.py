"""What a caller asks the engine to run: the command, its files and its limits, and the
files it wants back."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.engine.filecache import CachedFile
from sandbox.engine.repeats import Repeats
from sandbox.runtime.network import Traffic
from sandbox.runtime.profiles import Limits
from sandbox.runtime.pty import TtySize
from sandbox.runtime.results import RunResult


@dataclass(frozen=True)
class FileSpec:
    """A file to put into the container before the run (absolute path inside it): `content`
    copied in, or a file of the tenant's cache (`cached`, looked up for the tenant) bound
    read-only, executable when `mode` has an exec bit (runfiles.py)."""

    path: str
    content: bytes = b""
    mode: int = 0o644
    cached: CachedFile | None = None


@dataclass(frozen=True)
class RunSpec:
    cmd: list[str] | None = None         # None or empty: the image's Entrypoint + Cmd
    env: dict[str, str] | None = None    # merged over the image's Env
    cwd: str | None = None               # default: the image's WorkingDir or /
    stdin: bytes | int | None = None     # bytes, a readable fd (interactive), or nothing
    files: tuple[FileSpec, ...] = ()
    limits: Limits | None = None         # checked against the policy's maxima
    user: str | None = None              # default: the image's User
    copy_out: tuple[str, ...] = ()       # files to return, read after the run (absolute)
    copy_out_cached: tuple[str, ...] = ()  # files to keep in the tenant's file cache
    repeat: int = 1                      # run it this many times (repeats.py)
    rerun_near_limit: bool = False       # a time_limit near its limit is run once more
    tty: TtySize | None = None           # a terminal of this size is the run's 0-2 (pty.py)


@dataclass(frozen=True)
class CopiedOut:
    """What a run's copy_out and copy_out_cached brought back (copyout.py)."""

    files: dict[str, bytes] = field(default_factory=dict)        # copy_out: the content
    cached: dict[str, CachedFile] = field(default_factory=dict)  # copy_out_cached
    errors: dict[str, str] = field(default_factory=dict)         # why a path was not copied


NOTHING = CopiedOut()


@dataclass(frozen=True)
class RunOutcome:
    result: RunResult
    pool_hit: bool                       # a warm container (a session's run: False)
    image: str                           # the image digest the run used
    copied: CopiedOut = NOTHING          # what copy_out and copy_out_cached brought back
    repeats: Repeats | None = None       # a `repeat` run's spread; the result is its median
    rerun: RunResult | None = None       # the first run's, when rerun_near_limit reran it
    network: Traffic | None = None       # a proxy or full run's figures


# A pipeline's process asks what a run asks (its stdin: bytes or nothing; an fd is the
# pipeline's to give).
ProcessSpec = RunSpec


@dataclass(frozen=True)
class PipeSpec:
    """A pipe from one process's descriptor (1 or 2) to another's stdin (0), by (process
    index, fd). With `capture_bytes`, the host relays it and keeps its first N bytes."""

    src: tuple[int, int]
    dst: tuple[int, int]
    capture_bytes: int = 0


@dataclass(frozen=True)
class PipelineSpec:
    """Processes of one image wired by pipes (an interactor and a solution): in one
    container (`shared_container`) or each in its own of the same tenant's pool."""

    processes: tuple[RunSpec, ...]
    pipes: tuple[PipeSpec, ...] = ()
    shared_container: bool = True


@dataclass(frozen=True)
class PipelineOutcome:
    processes: tuple[RunOutcome, ...]     # each process's, in the order given
    captured: tuple[bytes, ...]           # per pipe: its first capture_bytes (b"" if none)
    truncated: tuple[bool, ...]           # per pipe: it carried more than it kept
