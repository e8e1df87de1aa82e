"""`sbx`: a docker-like command line for sandboxd, on the Python client.

    sbx run [OPTIONS] IMAGE [-- CMD...]    run a command, streaming its output
    sbx create [OPTIONS] IMAGE             keep a container (a session); prints its id
    sbx exec [OPTIONS] ID -- CMD...        run a command in a kept container
    sbx batch FILE|-                       run a batch of cases (POST /v1/batches's JSON)
    sbx ps | rm ID... | cp SRC DST         list, remove, copy files in and out
    sbx commit [OPTIONS] ID NAME:TAG       make an image of a kept container's changes
    sbx pull | images | rmi | tag | push | import    images
    sbx file put | ls | get | rm           the file cache: files runs take by id
    sbx build [OPTIONS] PATH|-             build an image from a Dockerfile
    sbx builder prune                      empty the build cache
    sbx info                               the service's host, pools and sessions
    sbx completion bash|zsh                a shell completion script

Every command takes --url (env SANDBOXD_URL) and --token (env SANDBOXD_TOKEN); `sbx
COMMAND --help` is its manual page (sbx/manual.py), examples and exit statuses included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import posixpath
import re
import secrets
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson

from sbx import terminal
from sbx.client import (
    DEFAULT_URL,
    ApiError,
    BuildContext,
    BuildEvent,
    BuildOutput,
    BuildStep,
    BuildWarning,
    Built,
    CaseDone,
    Client,
    Exit,
    File,
    FromCache,
    Output,
    PullProgress,
    RunEvent,
    RunOptions,
    RunResult,
    StepDone,
)
from sbx.contexttar import (
    ContextError,
    archive_kind,
    dockerfile_tar,
    peek,
    read_fd,
    tar_directory,
)
from sbx.manual import Example, Manual, ManualParser, summary

PLATFORM_HELP = ("os/arch[/variant] of a multi-platform image (default: the service's); "
                 "only the service's own architecture runs")
# The exit statuses of sbx run and sbx exec (exit_code_of), for their manual pages
RUN_EXITS = (
    ("N", "the command's own exit status (0: it succeeded)"),
    ("128+N", "a signal N ended the command"),
    ("120", "the command made a system call its policy forbids (syscall_blocked)"),
    ("121", "its output exceeded the output limit (output_limit)"),
    ("122", "it exceeded its memory limit (memory_limit)"),
    ("124", "it exceeded its CPU time or wall-clock limit (time_limit, wall_limit)"),
    ("120-125", "may also be the command's own status: -v prints the verdict on stderr"),
)
REMOVE_EXITS = (("0", "every one was removed; one that cannot be is told on stderr, the "
                      "others still go, and sbx exits 125"),)
SHELLS = ("bash", "zsh")

FAILED = 125  # Docker's code for "the daemon or the CLI failed", not the command
STATUS_EXIT = {"syscall_blocked": 120, "output_limit": 121, "memory_limit": 122,
               "time_limit": 124, "wall_limit": 124, "internal_error": FAILED}
VERDICTS = {
    "syscall_blocked": "the command made a system call its policy forbids",
    "output_limit": "the command's output exceeded its limit (the output is cut)",
    "memory_limit": "the command exceeded its memory limit",
    "time_limit": "the command used up its CPU time limit",
    "wall_limit": "the command exceeded its wall-clock limit",
    "internal_error": "sandboxd failed to run the command; see the service's log",
}
FIGURES = ("cpu_ms", "user_ms", "sys_ms", "wall_ms", "memory_peak_bytes", "setup_ms",
           "pool_hit", "measured_by", "image", "id")
SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(/.*)$")


class CliError(Exception):
    """A mistake sbx reports itself (bad arguments, local files)."""


def exit_code_of(result: RunResult) -> int:
    """The exit status of `sbx run` for a run's result (see RUN_EXITS)."""
    if result.status in ("ok", "nonzero_exit"):
        if result.exit_code is None:
            return 0 if result.status == "ok" else 1
        return result.exit_code
    if result.status == "signaled":
        return 128 + result.signal if result.signal else FAILED
    return STATUS_EXIT.get(result.status, FAILED)


# Arguments


def _limit(spec: str) -> tuple[str, int]:
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--limit takes KEY=VALUE (e.g. wall_ms=2000), not "
                                         f"{spec!r}")
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    scale = SIZE_SUFFIXES.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    try:
        number = int(text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {key}: {value!r} is not an integer (sizes "
                                         "may end in k, m or g)") from None
    return key, number


def _env(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"-e takes KEY=VALUE or KEY, not {spec!r}")
    if not sep:  # Docker's `-e KEY`: the value of this shell's KEY
        if key not in os.environ:
            raise argparse.ArgumentTypeError(f"-e {key}: no such variable in this environment; "
                                             f"give its value with -e {key}=VALUE")
        value = os.environ[key]
    return key, value


def _build_arg(spec: str) -> tuple[str, str] | None:
    key, sep, value = spec.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"--build-arg takes KEY=VALUE or KEY, not {spec!r}")
    if not sep:  # Docker's `--build-arg KEY`: this shell's KEY, and no argument when unset
        return (key, os.environ[key]) if key in os.environ else None
    return key, value


def _file(spec: str) -> tuple[str, str]:
    local, sep, remote = spec.partition(":/")
    if not sep or not local:
        raise argparse.ArgumentTypeError(f"--file takes LOCAL:/container/path, not {spec!r}")
    return local, "/" + remote


def _cached_file(spec: str) -> tuple[str, str]:
    file_id, sep, remote = spec.partition(":/")
    if not sep or not file_id:
        raise argparse.ArgumentTypeError(f"--cached-file takes ID:/container/path (the id sbx "
                                         f"file put printed), not {spec!r}")
    return file_id, "/" + remote


def _copy_out(spec: str) -> tuple[str, str]:
    remote, _, local = spec.partition(":")
    if not remote.startswith("/"):
        raise argparse.ArgumentTypeError(f"--copy-out takes /container/path[:LOCAL], not "
                                         f"{spec!r}")
    return remote, local or posixpath.basename(remote.rstrip("/"))


def _common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    hidden = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--url", help=f"the service (default: $SANDBOXD_URL or {DEFAULT_URL})",
                        **hidden)
    parser.add_argument("--token", help="bearer token (default: $SANDBOXD_TOKEN)", **hidden)


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-e", "--env", type=_env, action="append", default=[],
                        metavar="KEY[=VALUE]", help="set an environment variable")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory (absolute)")
    parser.add_argument("-u", "--user", help="user[:group], numeric or a name in the image")
    parser.add_argument("--limit", type=_limit, action="append", default=[], metavar="KEY=N",
                        help="a limit: cpu_ms, wall_ms, memory_bytes (k/m/g suffixes), pids, "
                             "output_bytes, file_size_bytes, open_files")
    parser.add_argument("--file", type=_file, action="append", default=[],
                        metavar="LOCAL:/PATH", help="copy a local file in before the command")
    parser.add_argument("--cached-file", type=_cached_file, action="append", default=[],
                        metavar="ID:/PATH", help="place a file of your file cache (sbx file "
                        "put) at /PATH, mode 0755, before the command")
    parser.add_argument("--copy-out", type=_copy_out, action="append", default=[],
                        metavar="/PATH[:LOCAL]", help="after the command, copy the file /PATH "
                        "out to LOCAL (default: its name, in the current directory)")
    parser.add_argument("--copy-out-cached", action="append", default=[], metavar="/PATH",
                        help="after the command, store the file /PATH in your file cache; "
                        "its id is printed on stderr")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="feed this terminal's stdin to the command (a WebSocket)")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="give the command a terminal (stderr merged into stdout); with "
                        "-i, this terminal in raw mode: every key goes to the command, "
                        "Ctrl-C too, as with docker run -it")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the verdict and figures on stderr")


def _completes(action: argparse.Action, kind: str) -> None:
    """Shell completion offers local paths for `action`: kind "file" or "directory" (shtab
    reads the attribute `complete`)."""
    action.complete = kind  # type: ignore[attr-defined]


def _subcommand(group: Any, name: str, text: str, manual: Manual | None,
                **kw: Any) -> ManualParser:
    """A command of `group` (sbx's subparsers, or a command's own): its one-line summary,
    its page, and the options every command takes."""
    p: ManualParser = group.add_parser(name, help=summary(text), description=text,
                                       manual=manual, **kw)
    _common(p, defaults=False)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = ManualParser(
        prog="sbx", description="Run untrusted code in sandboxd containers. Each command's "
        "manual is `sbx COMMAND --help`; every command takes --url and --token.",
        manual=Manual((
            Example("sbx pull busybox", "Pull busybox (from Docker Hub, or the mirror the "
                    "service's registry config names)."),
            Example("sbx run busybox -- echo hello", "Print hello from a new container."),
            Example("source <(sbx completion bash)", "Complete sbx's commands and options "
                    "in this bash (see sbx completion --help to keep it)."),
        ), exits=(("0", "it worked; sbx run and sbx exec exit with the command's own status "
                         "(see sbx run --help)"),),
            sections=(("ENVIRONMENT", f"SANDBOXD_URL: the service (default: {DEFAULT_URL}); "
                       "--url overrides it. SANDBOXD_TOKEN: the bearer token; --token "
                       "overrides it."),)))
    _common(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, manual: Manual | None, **kw: Any) -> ManualParser:
        return _subcommand(sub, name, text, manual, **kw)

    p = command("run", "Run a command in a new container of IMAGE, streaming its output; "
                "sbx exits with the command's status.", Manual((
                    Example("sbx run busybox -- echo hello", "Print hello."),
                    Example("sbx run -v --limit wall_ms=1000 busybox -- sleep 5",
                            "Stopped after a second: exit status 124, and the verdict "
                            "(wall_limit) and figures on stderr."),
                    Example("echo 'one two three' | sbx run -i busybox -- wc -w",
                            "Feed stdin to the command: prints 3."),
                    Example("sbx run -it busybox sh", "A shell on this terminal, as with "
                            "docker run -it: Ctrl-C goes to the program, `exit 3` makes sbx "
                            "exit 3, the terminal is restored after."),
                    Example("sbx run -e GREETING=hi -w /tmp busybox -- sh -c 'echo $GREETING "
                            "from $PWD'", "Set a variable and the working directory."),
                    Example("sbx run --file /etc/hostname:/tmp/host busybox -- cat /tmp/host",
                            "Copy a local file in before the command."),
                    Example("sbx run --copy-out /tmp/out.txt busybox -- sh -c 'date > "
                            "/tmp/out.txt'", "Copy /tmp/out.txt out to ./out.txt after it."),
                    Example("sbx run --policy judge --limit cpu_ms=500 --limit "
                            "memory_bytes=64m busybox -- echo judged", "A read-only root "
                            "(the judge profile) and limits on CPU time and memory."),
                ), exits=RUN_EXITS))
    _run_options(p)
    p.add_argument("--policy", help="profile: default (writable root) or judge (read-only)")
    p.add_argument("--network", choices=["none", "proxy", "full"],
                   help="none (default), proxy (HTTP(S) to the hosts the operator allows) or "
                   "full (when the operator enables it)")
    p.add_argument("--platform", help=PLATFORM_HELP)
    p.add_argument("image")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD",
                   help="the command (default: the image's entrypoint and cmd)")

    p = command("exec", "Run a command in a kept container (sbx create made it); sbx exits "
                "with the command's status.", Manual((
                    Example("id=$(sbx create busybox)", "Keep a container; its id in $id."),
                    Example("sbx exec \"$id\" -- sh -c 'echo kept > /tmp/note'",
                            "Run a command in it."),
                    Example("sbx exec \"$id\" -- cat /tmp/note",
                            "A later command sees what an earlier one left: prints kept."),
                    Example("sbx rm \"$id\"", "Remove the container."),
                ), exits=RUN_EXITS))
    _run_options(p)
    p.add_argument("container", metavar="ID")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")

    p = command("batch", "Run a batch: FILE (or '-' for stdin) is the JSON body of POST "
                "/v1/batches (the shared part of a run and its cases). Prints a line per case "
                "as it finishes (index, id, status, wall time) and a summary on stderr.",
                Manual((
                    Example("""echo '{"image": "busybox", "cmd": ["wc", "-w"], "cases": """
                            """[{"id": "a", "stdin": "1 2"}, {"id": "b", "stdin": "3"}]}' """
                            """> batch.json""", "Write a batch of two cases."),
                    Example("sbx batch batch.json", "Run it: a line per case, then the "
                            "summary on stderr."),
                    Example("sbx batch --json - < batch.json", "The same from stdin, printing "
                            "the service's events as JSON lines."),
                ), exits=(("0", "every case is ok"),
                          ("1", "a case was not ok, could not run, or was skipped"))))
    p.add_argument("--json", action="store_true",
                   help="print the service's events as they come, one JSON object a line")
    _completes(p.add_argument("body", metavar="FILE|-"), "file")

    p = command("create", "Create a kept container (a session); prints its id.", Manual((
        Example("id=$(sbx create --limit memory_bytes=64m busybox)",
                "Keep a container whose runs may use 64 MiB each; its id in $id."),
        Example("sbx exec \"$id\" -- uname -a", "Run commands in it (see sbx exec --help)."),
        Example("sbx rm \"$id\"", "Remove it."),
    )))
    p.add_argument("--policy", help="profile: default (writable root) or judge (read-only)")
    p.add_argument("--network", choices=["none", "proxy", "full"],
                   help="none (default), proxy (HTTP(S) to the hosts the operator allows) or "
                   "full (when the operator enables it)")
    p.add_argument("--platform", help=PLATFORM_HELP)
    p.add_argument("--limit", type=_limit, action="append", default=[], metavar="KEY=N",
                   help="a limit of its runs, as sbx run's --limit")
    p.add_argument("image")

    p = command("ps", "List the kept containers.", Manual((
        Example("sbx ps", "A table of your kept containers."),
        Example("sbx ps --json", "The service's JSON."),
    )))
    p.add_argument("--json", action="store_true", help="the service's JSON")
    p = command("rm", "Remove kept containers; prints each id once removed.", Manual((
        Example("sbx rm $(sbx create busybox)", "Create a container and remove it."),
    ), exits=REMOVE_EXITS))
    p.add_argument("containers", nargs="+", metavar="ID")
    p = command("cp", "Copy a file into a container (LOCAL ID:/PATH) or out of it "
                      "(ID:/PATH LOCAL). A directory comes as a tar of DIR/..., unpacked "
                      "into LOCAL (created if missing) without following or creating links "
                      "out of it; LOCAL '-' writes to stdout.", Manual((
                          Example("id=$(sbx create busybox)", "A kept container."),
                          Example("sbx cp /etc/hostname \"$id\":/tmp/hostname",
                                  "Copy a local file in."),
                          Example("sbx cp \"$id\":/tmp/hostname hostname.copy",
                                  "Copy it back out."),
                          Example("sbx cp \"$id\":/etc ./etc.copy",
                                  "Copy a directory out, unpacked into ./etc.copy."),
                          Example("sbx cp --tar \"$id\":/etc etc.tar",
                                  "The same directory as a tar."),
                          Example("sbx rm \"$id\"", "Remove the container."),
                      )))
    p.add_argument("--tar", action="store_true",
                   help="write a directory's tar to LOCAL ('-': stdout) instead of unpacking")
    _completes(p.add_argument("source"), "file")
    _completes(p.add_argument("destination"), "file")

    p = command("commit", "Make an image of what a kept container changed in its root "
                "(its tmpfs mounts such as /tmp are left out); prints the image's digest.",
                Manual((
                    Example("id=$(sbx create busybox)", "A kept container."),
                    Example("sbx exec -u 0 \"$id\" -- sh -c 'echo hello > /greeting'",
                            "Change its root, as its root (the image's user may not "
                            "write there)."),
                    Example("sbx commit -c 'CMD [\"cat\", \"/greeting\"]' -m greeting \"$id\" "
                            "greeting:1", "Make the image greeting:1, whose command prints "
                            "the file."),
                    Example("sbx run greeting:1", "Prints hello."),
                    Example("sbx rm \"$id\"", "Remove the container."),
                )))
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="a Dockerfile instruction for the image's config: CMD, ENTRYPOINT, "
                        "ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR "
                        "(repeatable)")
    p.add_argument("-m", "--message", help="the new layer's history comment")
    p.add_argument("-a", "--author", help='e.g. "Jane Doe <jane@example.com>"')
    p.add_argument("container", metavar="ID")
    p.add_argument("reference", metavar="NAME:TAG")
    p = command("pull", "Pull an image, showing progress per layer; prints its digest.",
                Manual((
                    Example("sbx pull busybox", "Pull busybox:latest."),
                    Example("sbx pull --platform linux/arm64/v8 busybox",
                            "Pull the arm64 image of a multi-platform one (kept, but only "
                            "the service's own architecture runs)."),
                )))
    p.add_argument("--platform", help=PLATFORM_HELP)
    p.add_argument("image")
    p = command("images", "List the images.", Manual((
        Example("sbx images", "A table: name, digest, size, created."),
        Example("sbx images --json", "The service's JSON."),
    )))
    p.add_argument("--json", action="store_true", help="the service's JSON")
    p = command("rmi", "Remove images (names or digests).", Manual((
        Example("sbx tag busybox mybox:1", "Give busybox another name."),
        Example("sbx rmi mybox:1", "Remove that name."),
    ), exits=REMOVE_EXITS))
    p.add_argument("-f", "--force", action="store_true", help="even when a container uses it")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p = command("tag", "Give an image another name.", Manual((
        Example("sbx tag busybox mybox:1", "busybox is also mybox:1."),
    )))
    p.add_argument("source")
    p.add_argument("target")
    p = command("push", "Push an image to a registry (to DST, or to its own name).", Manual((
        Example("sbx push busybox localhost:5000/busybox:1", "Push busybox to the registry "
                "at localhost:5000 (one the service's registry config lets it reach)."),
    )))
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST", nargs="?")
    p = command("import", "Import a root-filesystem tar (plain, gzip or zstd) as an image.",
                Manual((
                    Example("id=$(sbx create busybox)", "A kept container."),
                    Example("sbx cp --tar \"$id\":/bin rootfs.tar", "A root filesystem as a "
                            "tar: here busybox's /bin alone (its programs are static)."),
                    Example("sbx import rootfs.tar mybase:1", "Make it the image mybase:1."),
                    Example("sbx run mybase:1 -- /bin/echo imported", "Prints imported."),
                    Example("sbx rm \"$id\"", "Remove the container."),
                )))
    _completes(p.add_argument("tar", type=Path, metavar="TAR"), "file")
    p.add_argument("reference", metavar="NAME:TAG")
    p = command("build", "Build an image from a Dockerfile and a context: PATH, a directory "
                "(sent whole; the service applies its .dockerignore), or '-': a context tar "
                "(plain or gzip), or a lone Dockerfile, on stdin. Shows the steps as "
                "Docker's classic builder does.", Manual((
                    Example("printf 'FROM busybox\\nRUN echo hello > /hello\\nCMD [\"cat\", "
                            "\"/hello\"]\\n' > Dockerfile", "Write a Dockerfile."),
                    Example("sbx build -t hello:1 .", "Build it with the current directory "
                            "as the context."),
                    Example("sbx run hello:1", "Prints hello."),
                    Example("sbx build -q --no-cache -t hello:2 - < Dockerfile",
                            "The Dockerfile alone on stdin, no step from the cache; prints "
                            "only the image id."),
                ), exits=(("0", "the image is built"),
                          ("1", "the build failed, or could not start (the reason on "
                                "stderr)"))))
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME:TAG",
                   help="a name for the image (repeatable)")
    _completes(p.add_argument(
        "-f", "--file", metavar="FILE",
        help="the Dockerfile, a path from the current directory (default: PATH/Dockerfile; "
             "with PATH '-', a path inside the tar); '-' reads it from stdin"), "file")
    p.add_argument("--build-arg", type=_build_arg, action="append", default=[],
                   metavar="KEY[=VALUE]", help="a build argument (repeatable); KEY alone "
                   "takes this shell's $KEY, and is left out when that is unset")
    p.add_argument("--target", metavar="STAGE", help="the stage to build (default: the last)")
    p.add_argument("--no-cache", action="store_true",
                   help="run every step again instead of taking it from the build cache")
    p.add_argument("--platform", help="os/arch[/variant] to build for (default: the "
                   "service's); only the service's own architecture runs")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the image id; the build's output only if it fails, on "
                        "stderr")
    _completes(p.add_argument("context", metavar="PATH|-",
                              help="the build context: a directory, or '-' for stdin"),
               "directory")
    p = command("file", "Manage your file cache: files kept on the service by their content's "
                "hash, which runs take by id (--cached-file) instead of receiving them again; "
                "each goes when unused for the service's time to live.", Manual((
                    Example("sbx file ls", "List your cached files (see sbx file put --help "
                            "for the rest)."),
                )))
    cache = p.add_subparsers(dest="file_command", required=True, metavar="COMMAND")

    def file_command(name: str, text: str, manual: Manual) -> ManualParser:
        return _subcommand(cache, name, text, manual)

    p = file_command("put", "Store a file (PATH, or '-' for stdin); prints its id. The same "
                     "bytes give the same id.", Manual((
                         Example("printf '#!/bin/sh\\necho hello from the cache\\n' > hello.sh",
                                 "A small program."),
                         Example("id=$(sbx file put hello.sh)", "Store it; its id in $id."),
                         Example("sbx run --cached-file \"$id\":/tmp/hello busybox -- "
                                 "/tmp/hello", "A run takes it by id (placed at /tmp/hello, "
                                 "mode 0755)."),
                     )))
    _completes(p.add_argument("path", metavar="PATH"), "file")
    p = file_command("ls", "List your cached files.", Manual((
        Example("sbx file ls", "A table: id, size, created, expires."),
        Example("sbx file ls --json", "The service's JSON."),
    )))
    p.add_argument("--json", action="store_true", help="the service's JSON")
    p = file_command("get", "Download a cached file to stdout, or to OUT.", Manual((
        Example("id=$(echo hello | sbx file put -)", "Store a file from stdin."),
        Example("sbx file get -o hello.txt \"$id\"", "Download it to hello.txt."),
        Example("sbx file get \"$id\" | wc -c", "Or to stdout: prints 6."),
    )))
    _completes(p.add_argument("-o", "--output", type=Path, metavar="OUT",
                              help="the file to write (replaced only once the download is "
                                   "complete)"), "file")
    p.add_argument("file_id", metavar="ID")
    p = file_command("rm", "Delete cached files; prints each id once deleted.", Manual((
        Example("sbx file rm $(echo bye | sbx file put -)", "Store a file and delete it."),
    ), exits=REMOVE_EXITS))
    p.add_argument("file_ids", nargs="+", metavar="ID")
    p = command("job", "Async jobs: a run or batch the service runs later, kept with its "
                "result (and POSTed to a callback URL when it ends).", Manual((
                    Example("sbx job ls", "List your jobs (see sbx job submit --help for "
                            "the rest)."),
                )))
    jobs = p.add_subparsers(dest="job_command", required=True, metavar="COMMAND")

    def job_command(name: str, text: str, manual: Manual) -> ManualParser:
        return _subcommand(jobs, name, text, manual)

    # The examples of the commands that take a job's id start from this one
    submitted = Example("""job=$(echo '{"run": {"image": "busybox", "cmd": ["echo", "hi"]}}' """
                        """| sbx job submit -)""", "Submit a run; the job's id in $job.")
    waits = (("0", "the job is done"), ("1", "the job ended otherwise (failed, cancelled)"))
    p = job_command("submit", "Submit FILE (or '-' for stdin), the JSON body of POST /v1/jobs "
                    '({"run": ...} or {"batch": ...}); prints the job\'s id, or with --wait '
                    "the finished job.", Manual((
                        submitted,
                        Example("""echo '{"run": {"image": "busybox", "cmd": ["true"]}}' > """
                                """job.json""", "A job's body in a file."),
                        Example("sbx job submit --wait --key nightly-1 job.json",
                                "Submit it and wait for its end; submitting it again with the "
                                "same key gives the same job."),
                    ), exits=(("0", "submitted (with --wait: the job is done)"),
                              ("1", "with --wait: the job ended otherwise (failed, "
                                    "cancelled)"))))
    p.add_argument("--callback", metavar="URL", help="POST the finished job to URL (a host "
                   "the operator listed; signed, see `sbx job secret`)")
    p.add_argument("--key", metavar="KEY", help="an idempotency key: submitting the same "
                   "body with it again gives the same job")
    p.add_argument("--wait", action="store_true", help="wait for the job's end")
    _completes(p.add_argument("body", metavar="FILE|-"), "file")
    for name, text, example, exits in (
            ("get", "Show a job (JSON).",
             Example("sbx job get \"$job\"", "Its status, then its result."), None),
            ("wait", "Wait for a job's end, then show it.",
             Example("sbx job wait \"$job\"", "The finished job, as JSON."), waits),
            ("cancel", "Cancel a job (a running one is killed).",
             Example("sbx job cancel \"$job\"", "Cancel it (a finished job stays as it "
                     "ended)."), None),
            ("events", "Print a job's events as NDJSON until it ends.",
             Example("sbx job events \"$job\"", "Its events from the start, one JSON object "
                     "a line."), None)):
        manual = Manual((submitted, example), exits=exits or (("0", "it worked"),))
        job_command(name, text, manual).add_argument("job_id", metavar="ID")
    p = job_command("ls", "List your jobs, newest first.", Manual((
        Example("sbx job ls", "A table: id, kind, status, created, finished."),
        Example("sbx job ls --status done --json", "The finished ones, as the service's "
                "JSON."),
    )))
    p.add_argument("--status", help="only jobs of this status")
    p.add_argument("--json", action="store_true", help="the service's JSON")
    p = job_command("rm", "Forget finished jobs; prints each id once forgotten.", Manual((
        submitted,
        Example("sbx job wait \"$job\"", "Wait for its end."),
        Example("sbx job rm \"$job\"", "Forget it."),
    ), exits=REMOVE_EXITS))
    p.add_argument("job_ids", nargs="+", metavar="ID")
    p = job_command("secret", "Print the key your callbacks are signed with.", Manual((
        Example("sbx job secret", "The key a callback receiver checks the signature with."),
        Example("sbx job secret --rotate", "A new key, from now on."),
    )))
    p.add_argument("--rotate", action="store_true", help="make a new one (the old one stops "
                   "signing at once)")
    p = command("builder", "Manage the build cache.", Manual((
        Example("sbx builder prune", "Empty your build cache."),
    )))
    builder = p.add_subparsers(dest="builder_command", required=True, metavar="COMMAND")
    prune_help = "Empty your build cache; prints how much it removed and freed."
    p = _subcommand(builder, "prune", prune_help,
                    Manual((Example("sbx builder prune", "Empty it."),)))
    p.add_argument("-a", "--all", action="store_true",
                   help="accepted as docker's: the whole cache goes anyway")
    p.add_argument("-f", "--force", action="store_true",
                   help="accepted as docker's: sbx does not ask before pruning")
    command("info", "Show the service's host capabilities, pools and sessions (JSON).",
            Manual((Example("sbx info", "The service's report."),)))
    p = command("completion", "Print the shell completion script of sbx for SHELL: its "
                "commands, subcommands and options, and local paths where one is taken.",
                Manual((
                    Example("source <(sbx completion bash)", "Completion in this bash."),
                    Example("mkdir -p ~/.local/share/bash-completion/completions && sbx "
                            "completion bash > ~/.local/share/bash-completion/completions/sbx",
                            "In every new bash (with the bash-completion package)."),
                    Example("mkdir -p ~/.zfunc && sbx completion zsh > ~/.zfunc/_sbx",
                            "For zsh: with fpath+=(~/.zfunc) before compinit in ~/.zshrc."),
                )))
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    # Its help is `python -m loadtest`'s own, so it has no manual of sbx's
    command("loadtest", "Load-test the service: `python -m loadtest`'s options (`sbx "
                        "loadtest --help` lists them), with --url and --token from sbx's.",
            None, add_help=False)
    return parser


def _loadtest(args: argparse.Namespace, options: list[str]) -> int:
    """The load test drives its own client loop, so it runs outside `_main`'s Client."""
    from loadtest.__main__ import main as loadtest_main  # only this command needs it

    options = [o for o in options if o != "--"]
    if not {"--spawn", "-h", "--help"} & set(options):
        url = getattr(args, "url", None) or os.environ.get("SANDBOXD_URL") or DEFAULT_URL
        options += ["--url", url]
    if token := getattr(args, "token", None):
        options += ["--token", token]
    return loadtest_main(options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "loadtest":
        return _loadtest(args, extra)
    if args.command == "completion":
        from sbx.completion import script  # shtab takes ~0.15 s to import: only here

        print(script(parser, args.shell), end="")
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return asyncio.run(_main(args))
    except (ApiError, CliError) as e:
        print(f"sbx: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except terminal.Ended as e:
        return 128 + e.signum
    except BrokenPipeError:
        # `sbx run ... | head`: the reader left. Point stdout at /dev/null so the flush at
        # exit does not fail again, and exit as a program killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


async def _main(args: argparse.Namespace) -> int:
    try:
        client = Client(args.url, args.token)
    except ValueError as e:
        raise CliError(str(e)) from None
    async with client:
        handler: Callable[[Client, argparse.Namespace], Any] = COMMANDS[args.command]
        return int(await handler(client, args) or 0)


# Runs


def _write(stream: TextIO, data: str | bytes) -> None:
    if isinstance(data, str):
        stream.write(data)
        stream.flush()
        return
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(data.decode("utf-8", "replace"))
    else:
        stream.flush()  # text written before must come out first
        buffer.write(data)
        buffer.flush()
    stream.flush()


def _options(args: argparse.Namespace) -> RunOptions:
    options: RunOptions = {"binary": True}
    if args.env:
        options["env"] = dict(args.env)
    if args.workdir:
        options["cwd"] = args.workdir
    if args.user:
        options["user"] = args.user
    if args.limit:
        options["limits"] = dict(args.limit)
    files = []
    for local, remote in args.file:
        try:
            data = Path(local).read_bytes()
            mode = stat.S_IMODE(os.stat(local).st_mode)
        except OSError as e:
            raise CliError(f"--file {local}: {e.strerror}; give a readable local file") from None
        files.append(File(remote, data, mode))
    files += [FromCache(remote, file_id, 0o755) for file_id, remote in args.cached_file]
    if files:
        options["files"] = files
    if args.copy_out:
        options["copy_out"] = [remote for remote, _ in args.copy_out]
    if args.copy_out_cached:
        options["copy_out_cached"] = args.copy_out_cached
    if args.tty:
        options["tty"] = True
        options["tty_size"] = terminal.size()
    return options


def _attached(args: argparse.Namespace) -> bool:
    """-it: the run takes this terminal, which must be one."""
    if not (args.interactive and args.tty):
        return False
    if not os.isatty(sys.stdin.fileno()):
        raise CliError("the input device is not a TTY: leave out -t (sbx run -i), or run "
                       "sbx from a terminal")
    return True


def _cmd(args: argparse.Namespace) -> list[str] | None:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd or None


async def _print_events(events: AsyncIterable[RunEvent]) -> RunResult:
    try:
        async for event in events:
            if isinstance(event, Output):
                _write(sys.stdout if event.stream == "stdout" else sys.stderr, event.data)
            elif isinstance(event, Exit):
                return event.result
    finally:
        # The response is let go now, while the client is open: what follows the run
        # (--copy-out's writes) may fail, and the client closes on the way out.
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    raise ApiError(0, "stream_ended", "the stream ended before the run's exit event")


def _report(result: RunResult, verbose: bool) -> int:
    if result.status in VERDICTS:
        cause = result.raw.get("error")
        print(f"sbx: {result.status}: {VERDICTS[result.status]}"
              + (f" ({cause})" if cause else ""), file=sys.stderr)
    if verbose:
        figures = [f"status={result.status}", f"exit_code={result.exit_code}"]
        if result.signal:
            figures.append(f"signal={result.signal}")
        for key in FIGURES:
            value = result.raw.get(key)
            if value is not None:
                shown = ",".join(f"{k}:{v}" for k, v in value.items()) \
                    if isinstance(value, dict) else value
                figures.append(f"{key}={shown}")
        print("sbx: " + " ".join(figures), file=sys.stderr)
        for stream in ("stdout", "stderr"):
            if getattr(result, f"{stream}_truncated"):
                print(f"sbx: {stream} was cut at the output limit", file=sys.stderr)
        for warning in result.warnings:
            print(f"sbx: warning: {warning}", file=sys.stderr)
    return exit_code_of(result)


def _finish(result: RunResult, args: argparse.Namespace) -> int:
    """Write what --copy-out brought back, say what --copy-out-cached stored, then report."""
    for remote, local in args.copy_out:
        data = result.files.get(remote)
        if data is None:
            _warn(f"--copy-out {remote}: "
                  + result.file_errors.get(remote, "the service did not send it back"))
            continue
        with _replacing(Path(local)) as out:
            out.write(data if isinstance(data, bytes) else data.encode())
    for remote in args.copy_out_cached:
        entry = result.file_ids.get(remote)
        if entry is None:
            _warn(f"--copy-out-cached {remote}: "
                  + result.file_errors.get(remote, "the service did not store it"))
            continue
        size = entry.get("size")
        print(f"sbx: {remote} cached as {entry.get('id')}"
              + (f" ({_size(size)})" if isinstance(size, int) else ""), file=sys.stderr)
    return _report(result, args.verbose)


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[BinaryIO]:
    """A file spooled beside dest that replaces it when the block ends without an error;
    dest stays as it was otherwise (a download cut short leaves no half file)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    except OSError as e:
        raise CliError(f"cannot write {dest}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except OSError as e:
        raise CliError(f"cannot write {dest}: {e.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def _run(client: Client, args: argparse.Namespace) -> int:
    options = _options(args)
    if args.interactive:
        session = client.interactive(args.image, _cmd(args), policy=args.policy,
                                     network=args.network, platform=args.platform, **options)
        if _attached(args):
            return _finish(await terminal.attach(session), args)
        return _finish(await _interact(session), args)
    events = client.run_stream(args.image, _cmd(args), policy=args.policy,
                               network=args.network, platform=args.platform, **options)
    return _finish(await _print_events(events), args)


async def _exec(client: Client, args: argparse.Namespace) -> int:
    if not _cmd(args):
        raise CliError("sbx exec needs a command: sbx exec ID -- CMD...")
    options = _options(args)
    if args.interactive:
        session = client.interactive(None, _cmd(args), container=args.container, **options)
        if _attached(args):
            return _finish(await terminal.attach(session), args)
        return _finish(await _interact(session), args)
    events = client.exec_stream(args.container, _cmd(args), **options)
    return _finish(await _print_events(events), args)


def _pump_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    """Reads stdin in a daemon thread: a blocking read works for ttys, pipes and files
    alike, and a thread still blocked in it must not keep sbx from exiting."""
    fd = sys.stdin.fileno()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            chunk = b""
        try:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except RuntimeError:  # the loop is gone: sbx is exiting
            return
        if not chunk:
            return


async def _interact(session: contextlib.AbstractAsyncContextManager[Any]) -> RunResult:
    loop = asyncio.get_running_loop()
    async with session as run:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        threading.Thread(target=_pump_stdin, args=(loop, queue), daemon=True).start()

        async def feed() -> None:
            with contextlib.suppress(ConnectionError, ApiError):
                while chunk := await queue.get():
                    await run.send_stdin(chunk)
                await run.close_stdin()

        pending: set[asyncio.Task[None]] = set()

        def interrupt() -> None:
            task = loop.create_task(run.signal("SIGINT"))
            pending.add(task)
            task.add_done_callback(pending.discard)

        feeder = asyncio.create_task(feed())
        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            return await _print_events(run)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            feeder.cancel()


# Sessions


async def _create(client: Client, args: argparse.Namespace) -> int:
    answer = await client.create_container(args.image, policy=args.policy,
                                           network=args.network, platform=args.platform,
                                           limits=dict(args.limit) if args.limit else None)
    print(answer.get("id", ""))
    return 0


def _when(value: object) -> str:
    if isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value) if value is not None else "-"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _dump(obj: object) -> None:
    print(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


async def _ps(client: Client, args: argparse.Namespace) -> int:
    containers = await client.list_containers()
    if args.json:
        _dump(containers)
        return 0
    rows = [["ID", "IMAGE", "POLICY", "CREATED", "LAST USED", "ALIVE"]]
    for c in containers:
        names = c.get("names") or [c.get("image", "")]
        rows.append([str(c.get("id", "")), str(names[0]), str(c.get("policy", "")),
                     _when(c.get("created")), _when(c.get("last_used")),
                     "yes" if c.get("alive", True) else "no"])
    _table(rows)
    return 0


async def _each(ids: list[str], act: Callable[[str], Awaitable[object]]) -> int:
    """`act` on every id, each printed once done; one that fails is told on stderr, and the
    rest still go (as `docker rm A B` does)."""
    failed = False
    for one in ids:
        try:
            await act(one)
        except ApiError as e:
            print(f"sbx: {one}: {e}", file=sys.stderr)
            failed = True
        else:
            print(one)
    return FAILED if failed else 0


async def _rm(client: Client, args: argparse.Namespace) -> int:
    return await _each(args.containers, client.delete_container)


# Copying


async def _cp(client: Client, args: argparse.Namespace) -> int:
    src, dst = REMOTE.match(args.source), REMOTE.match(args.destination)
    if bool(src) == bool(dst):
        raise CliError("sbx cp copies between here and a container: give LOCAL ID:/PATH or "
                       "ID:/PATH LOCAL")
    if dst:
        local = Path(args.source)
        if local.is_dir():
            raise CliError(f"{local} is a directory; sbx cp uploads one file at a time")
        try:
            with local.open("rb") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                await client.put_file(dst[1], dst[2], f, mode=mode)
        except OSError as e:
            raise CliError(f"cannot read {local}: {e.strerror}") from None
        return 0
    assert src is not None
    if args.destination == "-":
        await client.copy_out(src[1], src[2], lambda chunk: _write(sys.stdout, chunk))
        return 0
    dest = Path(args.destination)
    # Spooled to disk as it arrives: a directory's tar is checked whole before anything
    # is unpacked, and a file is put in place only once it came complete.
    with tempfile.TemporaryFile(prefix="sbx-cp-") as spool:
        is_tar = await client.copy_out(src[1], src[2], spool.write)
        spool.seek(0)
        try:
            if is_tar and not args.tar:
                try:
                    count = extract_tar(spool, dest)
                except CliError as e:
                    raise CliError(f"{e}; sbx cp --tar keeps the archive as it came") from None
                print(f"sbx: {count} entries unpacked into {dest}", file=sys.stderr)
                return 0
            if dest.is_dir():
                dest = dest / (posixpath.basename(src[2].rstrip("/")) or "root")
            with dest.open("wb") as out:
                shutil.copyfileobj(spool, out, 1 << 20)
        except OSError as e:
            raise CliError(f"cannot write {dest}: {e.strerror}") from None
    return 0


def _parts(name: str, what: str) -> tuple[str, ...]:
    """A member name's components; refuses what could leave the destination."""
    if name.startswith("/") or "\0" in name:
        raise CliError(f"refusing the archive: {what} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise CliError(f"refusing the archive: {what} {name!r} climbs out with '..'")
    return parts


@dataclass(frozen=True)
class _Node:
    kind: str          # "dir" | "file" | "link"
    target: str = ""   # a link's


_DIR = _Node("dir")
_MAX_HOPS = 40  # links followed in one resolution, as the kernel allows


class _Tree:
    """What the destination will hold once the archive is unpacked: its members over what
    the destination holds already (looked at on disk, never through a link). Every rule is
    checked on this before anything is written, so a hostile archive leaves nothing
    behind and no member can use another (whatever their order) to reach outside."""

    def __init__(self, root: int | None) -> None:
        self.root = root                                     # dest, when it exists
        self.members: dict[tuple[str, ...], _Node] = {(): _DIR}
        self._disk: dict[tuple[str, ...], _Node | None] = {}

    def get(self, path: tuple[str, ...]) -> _Node | None:
        if path in self.members:
            return self.members[path]
        if path not in self._disk:
            self._disk[path] = self._look(path)
        return self._disk[path]

    def _look(self, path: tuple[str, ...]) -> _Node | None:
        if self.root is None:
            return None
        try:
            parent = _open_dir(self.root, list(path[:-1]), create=False)
        except (CliError, FileNotFoundError):
            return None
        try:
            st = os.stat(path[-1], dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return _Node("link", os.readlink(path[-1], dir_fd=parent))
            return _DIR if stat.S_ISDIR(st.st_mode) else _Node("file")
        except FileNotFoundError:
            return None
        finally:
            os.close(parent)

    def add(self, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "entry")
        for i in range(len(parts) - 1):
            self._parent(parts[:i + 1], m.name)
        old = self.get(parts)
        if m.isdir():
            node = _DIR
        elif m.issym():
            if m.linkname.startswith("/"):
                raise CliError(f"refusing the archive: the link {m.name!r} points to the "
                               f"absolute path {m.linkname!r}")
            node = _Node("link", m.linkname)
        elif m.islnk():
            target = _parts(m.linkname, "hard link target")
            through_dirs = all(self.members.get(target[:i]) == _DIR
                               for i in range(1, len(target)))
            if (target == parts or not through_dirs
                    or self.members.get(target) != _Node("file")):
                raise CliError(f"refusing the archive: the hard link {m.name!r} points to "
                               f"{m.linkname!r}, not to a file earlier in the archive")
            node = _Node("file")
        elif m.isreg():
            node = _Node("file")
        else:
            raise CliError(f"refusing the archive: {m.name!r} is a device or FIFO")
        if not parts and node != _DIR:
            raise CliError("refusing the archive: a non-directory entry names the "
                           "destination itself")
        if old is not None and old != node and _DIR in (old, node):
            raise CliError(f"refusing the archive: {m.name!r} would replace a "
                           f"{old.kind} with a {node.kind}")
        if old is not None and old.kind == "link" and old != node:
            # Links never change once there: what resolves through them now is what
            # resolves through them at the end, so checking the end is enough.
            raise CliError(f"refusing the archive: {m.name!r} would replace the link "
                           f"{'/'.join(parts)!r} (-> {old.target!r})")
        self.members[parts] = node

    def _parent(self, path: tuple[str, ...], name: str) -> None:
        node = self.get(path)
        if node is None:
            self.members[path] = _DIR
        elif node.kind == "link":
            raise CliError(f"refusing the archive: {name!r} goes through the link "
                           f"{'/'.join(path)!r} (-> {node.target!r})")
        elif node.kind != "dir":
            raise CliError(f"refusing the archive: {name!r} goes through the file "
                           f"{'/'.join(path)!r}")

    def check_links(self) -> None:
        """Every link of the archive, resolved as the kernel will once all is unpacked
        (through the other links, `..` after them), must stay inside the destination."""
        for path, node in self.members.items():
            if node.kind == "link":
                self._resolve(path, node.target)

    def _resolve(self, link: tuple[str, ...], target: str) -> None:
        where = list(link[:-1])
        pending = target.split("/")
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not where:
                    raise CliError(f"refusing the archive: the link {'/'.join(link)!r} "
                                   f"(-> {target!r}) leads outside the destination")
                where.pop()
                continue
            node = self.get((*where, part))
            if node is None or node.kind == "file":
                return  # the kernel stops there (ENOENT, ENOTDIR) or ends on a file inside
            if node.kind == "link":
                hops += 1
                if hops > _MAX_HOPS or node.target.startswith("/"):
                    raise CliError(f"refusing the archive: the link {'/'.join(link)!r} "
                                   f"(-> {target!r}) goes through "
                                   f"{'/'.join((*where, part))!r} (-> {node.target!r}), "
                                   "which leads outside the destination or loops")
                pending = node.target.split("/") + pending
                continue
            where.append(part)


def _open_dir(root: int, parts: list[str], *, create: bool = True) -> int:
    """A descriptor of root/parts, creating directories, never through a symlink."""
    fd = os.dup(root)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise
            except OSError:
                raise CliError(f"refusing the archive: {'/'.join(parts)!r} goes through a "
                               "link or a file") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _replace(parent: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):
        # Linux says EISDIR; unlink(2) on a directory may also give EPERM.
        if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise CliError(f"refusing the archive: {name!r} would replace a directory") \
                from None
        raise


def extract_tar(data: bytes | BinaryIO, dest: Path) -> int:
    """Unpacks a tar into dest (created if missing) as tarfile's "data" filter would, and
    stricter: no absolute or '..' names, no entry through a link, no link that leads out
    of dest once everything is unpacked (through earlier or later links: `d -> .` then
    `l -> d/../x` is refused), no hard link but to an earlier file, no devices, no setuid,
    setgid or write bits for others; files are owned by whoever runs sbx and written
    through directory descriptors opened without following links. Everything is checked
    before anything is written. Returns the number of entries."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with tarfile.open(fileobj=source) as tar:
        members = tar.getmembers()
        try:
            known: int | None = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            known = None
        try:
            tree = _Tree(known)
            for m in members:
                tree.add(m)
            tree.check_links()
        finally:
            if known is not None:
                os.close(known)
        dest.mkdir(parents=True, exist_ok=True)
        root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        dirs: list[tuple[list[str], int]] = []
        try:
            for m in members:
                parts = list(_parts(m.name, "entry"))
                if m.isdir():
                    os.close(_open_dir(root, parts))
                    dirs.append((parts, (m.mode & 0o755) | 0o700))
                    continue
                parent = _open_dir(root, parts[:-1])
                try:
                    _extract_one(tar, m, parent, parts[-1], root)
                finally:
                    os.close(parent)
            for parts, mode in reversed(dirs):  # last: a read-only directory is filled first
                fd = _open_dir(root, parts)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
        finally:
            os.close(root)
        return len(members)


def _extract_one(tar: tarfile.TarFile, m: tarfile.TarInfo, parent: int, name: str,
                 root: int) -> None:
    _replace(parent, name)
    if m.issym():
        os.symlink(m.linkname, name, dir_fd=parent)
        return
    if m.islnk():
        target = list(_parts(m.linkname, "hard link target"))
        source = _open_dir(root, target[:-1])
        try:
            os.link(target[-1], name, src_dir_fd=source, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(source)
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        reader = tar.extractfile(m)
        if reader is not None:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
        os.fchmod(out.fileno(), (m.mode & 0o755) | 0o600)


# Images


class PullBar:
    """One line per layer on stderr: redrawn in place on a terminal, a line per change of
    status otherwise (logs)."""

    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.layers: dict[str, PullProgress] = {}
        self.drawn = 0

    def update(self, p: PullProgress) -> None:
        before = self.layers.get(p.layer)
        self.layers[p.layer] = p
        if self.tty:
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{self.line(q)}\n"
                                        for q in self.layers.values()))
            self.drawn = len(self.layers)
        elif before is None or before.status != p.status:
            self.out.write(self.line(p) + "\n")
        self.out.flush()

    def line(self, p: PullProgress) -> str:
        name = p.layer.removeprefix("sha256:")[:12] or "image"
        if p.total:
            filled = min(self.WIDTH, self.WIDTH * p.done // p.total)
            bar = "=" * filled + (">" if filled < self.WIDTH else "")
            return (f"{name}: {p.status:<12} [{bar.ljust(self.WIDTH)}] "
                    f"{_size(p.done)}/{_size(p.total)}")
        return f"{name}: {p.status}" + (f" {_size(p.done)}" if p.done else "")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


async def _pull(client: Client, args: argparse.Namespace) -> int:
    bar = PullBar(sys.stderr)
    async for event in client.pull_stream(args.image, platform=args.platform):
        if isinstance(event, PullProgress):
            bar.update(event)
        else:
            print(event.image.get("digest", ""))
    return 0


async def _images(client: Client, args: argparse.Namespace) -> int:
    images = await client.images()
    if args.json:
        _dump(images)
        return 0
    rows = [["NAME", "DIGEST", "SIZE", "CREATED"]]
    for image in images:
        digest = str(image.get("digest", ""))
        short = digest[:19] if digest.startswith("sha256:") else digest
        size = image.get("size")
        for name in image.get("names") or ["<none>"]:
            rows.append([str(name), short, _size(size) if isinstance(size, int) else "-",
                         _when(image.get("created"))])
    _table(rows)
    return 0


async def _rmi(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for image in args.images:
        try:
            removed = await client.remove_image(image, force=args.force)
        except ApiError as e:
            print(f"sbx: {image}: {e}", file=sys.stderr)
            failed = True
        else:
            for name in removed or [image]:
                print(f"removed {name}")
    return FAILED if failed else 0


async def _commit(client: Client, args: argparse.Namespace) -> int:
    answer = await client.commit_container(args.container, args.reference,
                                           changes=args.change, message=args.message,
                                           author=args.author)
    print(answer.get("digest", ""))
    return 0


async def _tag(client: Client, args: argparse.Namespace) -> int:
    print(await client.tag_image(args.source, args.target))
    return 0


async def _push(client: Client, args: argparse.Namespace) -> int:
    print(await client.push_image(args.source, args.target))
    return 0


async def _import(client: Client, args: argparse.Namespace) -> int:
    if not args.tar.is_file():
        raise CliError(f"{args.tar} is not a file; give a root-filesystem tar")
    answer = await client.import_image(args.tar, args.reference)
    print(answer.get("digest", ""))
    return 0


async def _info(client: Client, _: argparse.Namespace) -> int:
    _dump(await client.info())
    return 0


# The file cache


async def _file_put(client: Client, args: argparse.Namespace) -> int:
    if args.path == "-":
        answer = await client.put_cached_file(sys.stdin.buffer)
    else:
        path = Path(args.path)
        if not path.is_file():
            raise CliError(f"{path} is not a file; give a file, or '-' for stdin")
        try:
            answer = await client.put_cached_file(path)
        except OSError as e:
            raise CliError(f"cannot read {path}: {e.strerror}") from None
    print(answer.get("id", ""))
    return 0


async def _file_ls(client: Client, args: argparse.Namespace) -> int:
    entries = await client.list_cached_files()
    if args.json:
        _dump(entries)
        return 0
    rows = [["ID", "SIZE", "CREATED", "EXPIRES"]]
    for f in entries:
        size = f.get("size")
        rows.append([str(f.get("id", "")), _size(size) if isinstance(size, int) else "-",
                     _when(f.get("created")), _when(f.get("expires"))])
    _table(rows)
    return 0


async def _file_get(client: Client, args: argparse.Namespace) -> int:
    if args.output is None:
        if sys.stdout.isatty():
            raise CliError("stdout is a terminal; give -o OUT or redirect stdout")
        await client.download_cached_file(args.file_id, lambda chunk: _write(sys.stdout, chunk))
        return 0
    with _replacing(args.output) as out:
        await client.download_cached_file(args.file_id, out.write)
    return 0


async def _file_rm(client: Client, args: argparse.Namespace) -> int:
    return await _each(args.file_ids, client.delete_cached_file)


FILE_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "put": _file_put, "ls": _file_ls, "get": _file_get, "rm": _file_rm}


async def _file_cache(client: Client, args: argparse.Namespace) -> int:
    return int(await FILE_COMMANDS[args.file_command](client, args))


# Jobs

async def _job_submit(client: Client, args: argparse.Namespace) -> int:
    job = await client.submit_job(_body_file(args.body, "POST /v1/jobs"),
                                  callback_url=args.callback, idempotency_key=args.key)
    if not args.wait:
        print(job.get("id", ""))
        return 0
    return _job_end(await client.wait_job(str(job.get("id", ""))))


def _job_end(job: dict[str, Any]) -> int:
    _dump(job)
    return 0 if job.get("status") == "done" else 1


async def _job_ls(client: Client, args: argparse.Namespace) -> int:
    found = await client.list_jobs(args.status)
    if args.json:
        _dump(found)
        return 0
    rows = [["ID", "KIND", "STATUS", "CREATED", "FINISHED"]]
    rows += [[str(j.get("id", "")), str(j.get("kind", "")), str(j.get("status", "")),
              _when(j.get("created")), _when(j.get("finished"))] for j in found]
    _table(rows)
    return 0


async def _job_events(client: Client, args: argparse.Namespace) -> int:
    async for event in client.job_events(args.job_id):
        print(orjson.dumps(event).decode(), flush=True)
    return 0


async def _job_secret(client: Client, args: argparse.Namespace) -> int:
    print(await client.job_secret(rotate=args.rotate))
    return 0


JOB_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "submit": _job_submit, "ls": _job_ls, "events": _job_events, "secret": _job_secret,
    "get": lambda c, a: _shown(c.get_job(a.job_id)),
    "cancel": lambda c, a: _shown(c.cancel_job(a.job_id)),
    "wait": lambda c, a: _waited(c, a.job_id),
    "rm": lambda c, a: _each(a.job_ids, c.delete_job)}


async def _shown(answer: Awaitable[dict[str, Any]]) -> int:
    _dump(await answer)
    return 0


async def _waited(client: Client, job_id: str) -> int:
    return _job_end(await client.wait_job(job_id))


async def _job(client: Client, args: argparse.Namespace) -> int:
    return int(await JOB_COMMANDS[args.job_command](client, args))


# Batches

def _body_file(source: str, endpoint: str) -> dict[str, Any]:
    """The JSON object in `source` (a path, or '-' for stdin): `endpoint`'s body."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {source}: {e.strerror}") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise CliError(f"{source} is not JSON ({e}); give the body of {endpoint}") from None
    if not isinstance(body, dict):
        raise CliError(f"{source} must hold one JSON object, the body of {endpoint}")
    return body


async def _batch(client: Client, args: argparse.Namespace) -> int:
    all_ok = True
    async for event in client.batch_body(_body_file(args.body, "POST /v1/batches")):
        if args.json:
            print(orjson.dumps(event.raw).decode(), flush=True)
        if isinstance(event, CaseDone):
            all_ok = all_ok and event.result is not None and event.result.status == "ok"
            if not args.json:
                what = (f"{event.result.status}\t{event.result.wall_ms} ms" if event.result
                        else f"error\t{event.error}")
                print(f"{event.index}\t{event.id or '-'}\t{what}", flush=True)
        else:
            counts = ", ".join(f"{n} {status}" for status, n in sorted(event.by_status.items()))
            print(f"{event.cases} cases: {counts or 'none ran'}; {event.errors} could not run, "
                  f"{event.skipped} skipped ({event.wall_ms:.0f} ms)", file=sys.stderr)
            all_ok = all_ok and event.skipped == 0
    return 0 if all_ok else 1


# Builds

def _short_id(digest: str) -> str:
    return digest.partition(":")[2][:12] or digest[:12]


def _familiar(name: str) -> str:
    """A name as Docker shows it: docker.io/library/app:1 is app:1."""
    rest = name.removeprefix("docker.io/")
    if rest != name and rest.startswith("library/") and rest.count("/") == 1:
        return rest.removeprefix("library/")
    return rest


class BuildPrinter:
    """A build's events as Docker's classic builder prints them: steps and their commands'
    output (both streams) on stdout, warnings on stderr. Quiet (-q), it all goes to a
    buffer, written to stderr only if the build fails (as `docker build -q` does), and
    success prints only the image id."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.buffer = io.StringIO()
        self.log: TextIO = self.buffer if quiet else sys.stdout
        self.warnings: TextIO = self.buffer if quiet else sys.stderr
        self.fresh = True  # the log is at the start of a line

    def show(self, event: BuildEvent) -> None:
        if isinstance(event, BuildStep):
            self._line(f"Step {event.step}/{event.steps} : {event.instruction}")
        elif isinstance(event, BuildOutput):
            if event.data:
                _write(self.log, event.data)
                self.fresh = event.data.endswith("\n")
        elif isinstance(event, StepDone):
            if event.cached:
                self._line(" ---> Using cache")
            if event.layer:
                self._line(f" ---> {_short_id(event.layer)}")
        elif isinstance(event, BuildWarning):
            self._line(f"[Warning] {event.message}", self.warnings)
        elif isinstance(event, Built):
            self._line(f"Successfully built {_short_id(event.config_digest)}")
            for name in event.names:
                self._line(f"Successfully tagged {_familiar(name)}")
            if self.quiet:
                print(event.config_digest)

    def fail(self, message: str) -> None:
        self._end_line()
        if self.quiet:
            sys.stderr.write(self.buffer.getvalue())
        print(f"sbx: {message}", file=sys.stderr)

    def _end_line(self) -> None:
        if not self.fresh:
            self.log.write("\n")
            self.fresh = True

    def _line(self, text: str, stream: TextIO | None = None) -> None:
        if stream is None or stream is self.log:
            self._end_line()
        _write(stream or self.log, text + "\n")


def _warn(message: str) -> None:
    print(f"sbx: warning: {message}", file=sys.stderr)


def _from_stdin() -> int:
    fd = sys.stdin.fileno()
    if os.isatty(fd):
        raise CliError("stdin is a terminal; pipe the context tar (or the Dockerfile) into "
                       "sbx build, e.g. tar -C DIR -c . | sbx build -")
    return fd


async def _stdin_context(dockerfile: str | None) -> tuple[BuildContext, str | None]:
    """`sbx build -`: a tar or a gzip as it comes, or else a lone Dockerfile, as Docker
    takes them."""
    if dockerfile == "-":
        raise CliError("-f - reads the Dockerfile from stdin, where `sbx build -` reads the "
                       "context: give the context as a directory")
    head, chunks = await peek(read_fd(_from_stdin(), "stdin"))
    kind = archive_kind(head)
    if kind in ("tar", "gzip"):
        return chunks, dockerfile
    if kind is not None:
        await chunks.aclose()
        raise CliError(f"the context on stdin is {kind}-compressed; sandboxd takes a plain "
                       "or gzip tar: recompress it with gzip")
    data = b"".join([chunk async for chunk in chunks])
    if not data.strip():
        raise CliError("stdin is empty; pipe a context tar or a Dockerfile into sbx build -")
    if dockerfile is not None:
        raise CliError("stdin holds a Dockerfile, not a context tar, so -f has nothing to "
                       "name; leave -f out")
    return dockerfile_tar(data), None


async def _build_context(args: argparse.Namespace) -> tuple[BuildContext, str | None]:
    """The context to send and the Dockerfile's name in it (None: the service's default).
    A Dockerfile outside the context (or from stdin) goes in under a name of its own."""
    if args.context == "-":
        return await _stdin_context(args.file)
    root = Path(args.context)
    if not root.is_dir():
        raise CliError(f"{root} is not a directory; give the build context as a directory, "
                       "or '-' to read a tar from stdin")
    if args.file is None:
        return tar_directory(root, warn=_warn), None
    if args.file == "-":
        data = b"".join([chunk async for chunk in read_fd(_from_stdin(), "stdin")])
    else:
        given = Path(args.file)
        try:
            dockerfile = given.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CliError(f"cannot find the Dockerfile {given} (-f is a path from the "
                           "current directory)") from None
        if not dockerfile.is_file():
            raise CliError(f"the Dockerfile {given} is not a file")
        if dockerfile.is_relative_to(root.resolve()):
            inside = dockerfile.relative_to(root.resolve()).as_posix()
            return tar_directory(root, warn=_warn), inside
        try:
            data = dockerfile.read_bytes()
        except OSError as e:
            raise CliError(f"cannot read the Dockerfile {given}: {e.strerror}") from None
    name = f".sbx-dockerfile-{secrets.token_hex(8)}"
    return tar_directory(root, extra={name: data}, warn=_warn), name


async def _build(client: Client, args: argparse.Namespace) -> int:
    printer = BuildPrinter(args.quiet)
    try:
        context, dockerfile = await _build_context(args)
        build_args = dict(arg for arg in args.build_arg if arg is not None)
        async for event in client.build(context, tags=args.tag, dockerfile=dockerfile,
                                        build_args=build_args, target=args.target,
                                        no_cache=args.no_cache, platform=args.platform):
            printer.show(event)
    except (ApiError, CliError, ContextError) as e:
        printer.fail(str(e))  # docker build's status for every failure
        return 1
    return 0


async def _builder(client: Client, args: argparse.Namespace) -> int:
    answer = await client.prune_build_cache()
    removed, freed = answer.get("removed"), answer.get("freed_bytes")
    print(f"Deleted build cache entries: {removed if isinstance(removed, int) else 0}")
    print(f"Total reclaimed space: {_size(freed if isinstance(freed, int) else 0)}")
    return 0


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "run": _run, "exec": _exec, "create": _create, "ps": _ps, "rm": _rm, "cp": _cp,
    "commit": _commit, "pull": _pull, "images": _images, "rmi": _rmi, "tag": _tag, "push": _push,
    "import": _import, "info": _info, "build": _build, "builder": _builder, "file": _file_cache,
    "batch": _batch, "job": _job,
}


if __name__ == "__main__":
    sys.exit(main())
