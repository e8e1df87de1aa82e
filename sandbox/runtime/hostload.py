"""How contended the CPUs were around a run: the kernel's CPU pressure (PSI).

`some total` counts the microseconds during which at least one runnable task waited for a
CPU; over a run's window its share is the run's host_load. On cgroup v2 it is the run
cgroup's own cpu.pressure: how long the run itself waited (0: it had a CPU whenever it
wanted one). cgroup v1 keeps no pressure per cgroup: there it is the host's
(/proc/pressure/cpu), and a run on a CPU of its own still sees neighbours waiting on the
others, which is why a result carries dedicated_cpu beside it.
"""

from __future__ import annotations

import os
import threading

PSI_CPU = "/proc/pressure/cpu"
HOST = "psi:/proc/pressure/cpu"          # measured_by["host_load"]

_lock = threading.Lock()
_fd: int | None = None
_absent = False


def cpu_pressure_us() -> int | None:
    """The host's CPU pressure counter (µs some task waited), or None without PSI."""
    global _fd, _absent
    if _absent:
        return None
    if _fd is None:
        with _lock:
            if _fd is None:
                try:
                    # Kept open: a pread costs ~2 µs, an open and read ~13 µs, per run twice.
                    _fd = os.open(PSI_CPU, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    _absent = True  # a kernel without CONFIG_PSI, or psi=0 at boot
                    return None
    try:
        return some_total(os.pread(_fd, 256, 0))
    except OSError:
        return None


def some_total(text: bytes) -> int | None:
    """The `some` line's total of a PSI file ("some avg10=… total=N\nfull …")."""
    try:
        return int(text.split(b"\n", 1)[0].rsplit(b"total=", 1)[1])
    except (IndexError, ValueError):
        return None


def share(before_us: int | None, after_us: int | None, window_ns: int) -> float | None:
    """The part of a window (0..1) during which some task waited for a CPU."""
    if before_us is None or after_us is None or window_ns <= 0:
        return None
    return round(min(1.0, max(0.0, (after_us - before_us) * 1000 / window_ns)), 3)
