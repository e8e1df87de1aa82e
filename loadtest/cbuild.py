"""The C programs the benchmarks build with the host's gcc (loadtest/native/, workloads/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from loadtest.baseline import BenchError

NATIVE = Path(__file__).resolve().parent / "native"
# A program that only exits: a run of it costs what the sandbox does, not a libc's start.
EXIT0_SOURCE = NATIVE / "exit0.c"
EXIT0_FLAGS = ("-static", "-nostdlib", "-O2")


def build(source: Path, out: Path, flags: tuple[str, ...] = ("-O2",)) -> Path:
    """gcc FLAGS -o OUT SOURCE, executable; BenchError with gcc's message when it fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError(f"gcc is needed to build {source.name}: apt-get install gcc libc6-dev")
    done = subprocess.run([gcc, *flags, "-o", str(out), str(source)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"cannot build {source.name} (gcc {' '.join(flags)}):\n"
                         f"{done.stderr.strip()}")
    out.chmod(0o755)
    return out


def build_exit0(dest_dir: Path) -> Path:
    """exit0 (loadtest/native/exit0.c) built into dest_dir."""
    return build(EXIT0_SOURCE, dest_dir / "exit0", EXIT0_FLAGS)
