"""What a caller asks the engine to run: the command, its files and its limits, and the
files it wants back."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.engine.filecache import CachedFile
from sandbox.runtime.profiles import Limits
from sandbox.runtime.results import RunResult


@dataclass(frozen=True)
class FileSpec:
    """A file to put into the container before the run (absolute path inside it)."""

    path: str
    content: bytes
    mode: int = 0o644


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
