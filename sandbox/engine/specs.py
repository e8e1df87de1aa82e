"""What a caller asks the engine to run: the command, its files and its limits."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.runtime.profiles import Limits


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
