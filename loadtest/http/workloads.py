"""The workloads: one busybox shell script each, run the same way sandboxed and bare; and
judge-c, whose requests are whole submissions to a code judge with a compiler (the C
solution, its compile command and its cases are here, how they run in loadtest/http/judge.py).

A script is identical in both modes; only its environment differs: `PATH` and `BIN` name
the busybox applets (/bin in the container, a copy of the same busybox rootfs bare) and
`TMPDIR` a tmpfs directory (/tmp in the container, /dev/shm bare when it is a tmpfs).
Explicit "$BIN/applet" paths matter: busybox sh runs applets such as `true` in-process
when named bare, and the fork workload must really fork and exec.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20

# Generous for every workload on a loaded 2-core machine, inside the judge profile's maxima.
_LIMITS: dict[str, int] = {"cpu_ms": 30_000, "wall_ms": 60_000}
JUDGE_CASES = 20
# The "solution" a contestant submitted: the sum of the numbers on its input's one line.
JUDGE_SOLUTION = """#!/bin/sh
read -r line
s=0
for n in $line; do s=$((s + n)); done
echo "$s"
"""
JUDGE_PATH = "/tmp/solution.sh"
# The same problem solved in C, as a contestant would.
JUDGE_C_SOLUTION = """#include <stdio.h>

int main(void) {
    long long sum = 0, n;
    while (scanf("%lld", &n) == 1)
        sum += n;
    printf("%lld\\n", sum);
    return 0;
}
"""
JUDGE_C_PATH = "/tmp/solution.c"
JUDGE_BINARY = "/tmp/solution"


def judge_compile(source: str, binary: str) -> list[str]:
    """The compile command: static, so the binary runs in an image without a libc."""
    return ["gcc", "-O2", "-static", "-std=gnu11", "-o", binary, source, "-lm"]


def judge_input(case: int) -> str:
    return " ".join(str(case * 7 + k) for k in range(case + 1)) + "\n"


def judge_answer(case: int) -> str:
    return f"{sum(case * 7 + k for k in range(case + 1))}\n"


@dataclass(frozen=True)
class Workload:
    name: str
    measures: str                       # what one request measures, for the report
    script: str                         # busybox sh -c text
    policy: str = "judge"
    limits: dict[str, int] = field(default_factory=lambda: dict(_LIMITS))
    files: tuple[tuple[str, str, int], ...] = ()       # (path, content, mode), copied in
    stdin: Callable[[int], str] | None = None          # request number -> its stdin
    expect: Callable[[int], str] | None = None         # request number -> exact stdout
    argv: tuple[str, ...] | None = None                # a busybox applet run directly
    # Needs the compiler image: a request is a submission (compile, then every case), and
    # stdin and expect take the case number (loadtest/http/judge.py).
    compiler: bool = False

    @property
    def command(self) -> list[str]:
        """What runs: the applet itself (one exec), or `sh -c` with the script."""
        return list(self.argv) if self.argv else ["sh", "-c", self.script]

    def run_body(self, image: str, seq: int) -> dict[str, Any]:
        """The POST /v1/runs body of request number `seq`."""
        body: dict[str, Any] = {
            "image": image, "cmd": self.command, "policy": self.policy,
            "env": {"PATH": "/bin", "BIN": "/bin", "TMPDIR": "/tmp"},
            "limits": self.limits,
        }
        if self.files:
            body["files"] = [{"path": p, "content": c, "mode": m} for p, c, m in self.files]
        if self.stdin is not None:
            body["stdin"] = self.stdin(seq)
        return body

    def check(self, seq: int, stdout: str) -> bool:
        return self.expect is None or stdout == self.expect(seq)


def _judge_script() -> str:
    # The bare baseline has no /tmp/solution.sh of its own: it finds it under $TMPDIR.
    return f'exec sh "${{SOLUTION:-{JUDGE_PATH}}}"'


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("exec", "busybox true executed directly, no shell: the fixed cost of one "
             "sandboxed exec", "", argv=("true",)),
    Workload("true", "a run that does nothing: the fixed cost of a sandboxed run",
             '"$BIN/true"'),
    Workload("cpu", "CPU-bound: 100,000 iterations of shell arithmetic (no syscalls)",
             "i=0; while [ $i -lt 100000 ]; do i=$((i + 1)); done"),
    Workload("syscalls", "syscall-bound: dd bs=1 copies 200,000 bytes from /dev/zero to "
             "/dev/null, 400,000 read/write calls of one byte",
             '"$BIN/dd" if=/dev/zero of=/dev/null bs=1 count=200000 2>/dev/null'),
    Workload("fork", "fork-bound: 100 children, each a fork and exec of busybox true",
             'for i in $("$BIN/seq" 100); do "$BIN/true"; done'),
    Workload("io", "I/O: dd writes 64 MiB to a file in tmpfs ($TMPDIR) and reads it back",
             'f="$TMPDIR/io.$$"; "$BIN/dd" if=/dev/zero of="$f" bs=1048576 count=64 '
             '2>/dev/null && "$BIN/dd" if="$f" of=/dev/null bs=1048576 2>/dev/null; '
             'r=$?; "$BIN/rm" -f "$f"; exit $r',
             limits={**_LIMITS, "memory_bytes": 512 * MiB, "file_size_bytes": 128 * MiB}),
    Workload("memory", "memory: dd reads 256 MiB of /dev/zero into one buffer, faulting in "
             "every page (peak RSS ~257 MiB)",
             '"$BIN/dd" if=/dev/zero of=/dev/null bs=268435456 count=1 2>/dev/null',
             limits={**_LIMITS, "memory_bytes": 512 * MiB}),
    Workload("judge", f"code judge: a shell-script solution copied in with `files`, run on "
             f"one of {JUDGE_CASES} inputs per request, its output checked",
             _judge_script(), files=((JUDGE_PATH, JUDGE_SOLUTION, 0o755),),
             stdin=lambda seq: judge_input(seq % JUDGE_CASES),
             expect=lambda seq: judge_answer(seq % JUDGE_CASES)),
    Workload("judge-c", f"code judge with a compiler: one submission, a C solution compiled "
             f"once in a session of the gcc image (source copied in, binary copied out), "
             f"then run on each of {JUDGE_CASES} inputs in the busybox image, every output "
             f"checked", shlex.join(judge_compile(JUDGE_C_PATH, JUDGE_BINARY)),
             files=((JUDGE_C_PATH, JUDGE_C_SOLUTION, 0o644),), stdin=judge_input,
             expect=judge_answer, compiler=True),
)}


def select(names: str, *, compiler: bool = True) -> list[Workload]:
    """'all' or comma-separated names, in the order given. Without a compiler image
    (`compiler` False), 'all' leaves out the workloads that need one, and naming one is
    an error."""
    everything = names.strip() == "all"
    wanted = [n for n, w in WORKLOADS.items() if compiler or not w.compiler] if everything \
        else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in WORKLOADS]
    if unknown or not wanted:
        raise ValueError(f"unknown workload {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(WORKLOADS)} or all")
    blind = [n for n in wanted if WORKLOADS[n].compiler and not compiler]
    if blind:
        raise ValueError(f"workload {', '.join(blind)} needs an image with a compiler: with "
                         f"--url, pass --compiler-image REF (a gcc image the service can "
                         f"pull), or use --spawn")
    return [WORKLOADS[n] for n in wanted]


def needing_compiler(names: str) -> bool:
    """Whether the selection `names` holds a workload that needs the compiler image."""
    return any(w.compiler for w in select(names))
