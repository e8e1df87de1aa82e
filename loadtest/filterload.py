"""The seccomp filter's load: `python -m loadtest.filterload [--loads N] [--quick]`.

Every run's child loads its policy's filter right before execve, and the kernel converts,
JIT-compiles and caches it at each load. This times that one `seccomp()` call alone, in a
C loop (loadtest/native/filterload.c: fork, no_new_privs, the call timed in the child),
for each built-in seccomp profile as the runtime compiles it (policies/seccomp/; plain,
and in the own-process-only form of runs that share init's id), beside the bare
equivalent in the same run: a one-instruction filter (allow everything), which costs the
load's fixed part. The programs take turns, load by load, so the machine's drift falls on
each alike. Figures and ratios only; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.baseline import BenchError
from loadtest.cbuild import NATIVE, build
from loadtest.http.service import stop_on_sigterm
from loadtest.output import emit
from loadtest.rows import Row, table
from sandbox.runtime import bpf
from sandbox.runtime.seccomp import (
    builtin_profile_names,
    builtin_profile_path,
    compile_profile,
    load_profile,
)

SOURCE = NATIVE / "filterload.c"
ALLOW = bpf.insn(bpf.RET_K, 0, 0, 0x7FFF0000)   # SECCOMP_RET_ALLOW
BARE = "one-instruction filter"
QUICK_LOADS = 20


def programs() -> dict[str, bytes]:
    """Each built-in seccomp profile's program as the runtime compiles it, both forms."""
    out = {}
    for name in builtin_profile_names():
        profile = load_profile(builtin_profile_path(name))
        out[name] = compile_profile(profile).bpf
        out[f"{name}, own-process-only"] = compile_profile(profile, own_process_only=True).bpf
    return out


def measure(progs: dict[str, bytes], loads: int) -> dict[str, dict[str, float]]:
    """Each program's load (µs: p10, median, p90) and instructions, by name."""
    with tempfile.TemporaryDirectory(prefix="filterload-") as tmp:
        exe = build(SOURCE, Path(tmp) / "filterload")
        files = {}
        for i, (name, prog) in enumerate(progs.items()):
            files[name] = Path(tmp) / f"{i}.bpf"
            files[name].write_bytes(prog)
        done = subprocess.run([str(exe), str(loads), *map(str, files.values())],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"the load loop failed: {done.stderr.strip()}")
    by_file = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    out = {}
    for name, path in files.items():
        insns, p10, median, p90 = (int(v) for v in by_file[str(path)])
        out[name] = {"instructions": insns, "p10_us": p10 / 1000, "median_us": median / 1000,
                     "p90_us": p90 / 1000}
    return out


def rows(figures: dict[str, dict[str, float]]) -> list[Row]:
    bare = figures[BARE]
    out = []
    for name, fig in figures.items():
        if name == BARE:
            continue
        what = f"`{name}` ({fig['instructions']} insns)"
        out += [Row(f"{what}: load median (µs)", fig["median_us"],
                    ((BARE, bare["median_us"]),)),
                Row(f"{what}: load p90 (µs)", fig["p90_us"], ((BARE, bare["p90_us"]),))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.filterload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, default=2000,
                    help="loads of each program (default 2000)")
    ap.add_argument("--quick", action="store_true", help="few loads, for the test suite")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    if args.loads < 10:
        ap.error("--loads: at least 10 (the figures are percentiles)")
    loads = QUICK_LOADS if args.quick else args.loads
    try:
        figures = measure({**programs(), BARE: ALLOW}, loads)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(table(rows(figures)))
    result: dict[str, Any] = {"loads": loads, "programs": figures}
    emit(result, json_only=True)   # the table above is the human part: the JSON line only
    return 0


if __name__ == "__main__":
    sys.exit(main())
