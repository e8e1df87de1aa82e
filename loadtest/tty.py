"""A keystroke's echo through `sbx run -it`: `python -m loadtest.tty [--spawn | --url URL
--image REF] [--echoes N]`.

sbx itself (the same client code, `sbx/terminal.py`) runs `sbx run -it IMAGE sh -c 'stty raw
-echo isig; cat'` on a local pty, as a terminal emulator would run it; this process is the
emulator: it writes one byte to the pty's master and times until the byte comes back
(through sbx's raw terminal, the WebSocket, the service, the run's pty in the container,
`cat`, and back), N times after a warm-up. Beside it, in the same run, the bare equivalent:
`cat` on a local pty in raw mode, no event loop, no network, the same timing loop. Printed:
median and p99 of each, their ratio, and the host's load average (the machine may be shared).
The last line is one JSON object.

--spawn starts its own registry and `sandboxd serve` (removed at the end); --url (loopback
only) and --image (a busybox image it can pull) name a running service.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from statistics import median

from loadtest.baseline import BenchError, percentile
from loadtest.http.service import (
    LoadTestError,
    add_target_args,
    check_loopback,
    spawned,
    stop_on_sigterm,
)
from loadtest.output import emit

DEFAULT_ECHOES = 500
WARMUP = 20
READY = b"READY"
WAIT_S = 60.0   # for the run to come up (a pull, a cold container)
# The program in the container: raw (each byte passes at once) without echo (only cat's
# copy comes back), signals kept so that the closing Ctrl-C ends cat.
REMOTE = "stty raw -echo isig; echo READY; exec cat"
SBX = "import sys\nfrom sbx.cli import main\nsys.exit(main())"


def _pty() -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return master, slave


def _read_until(master: int, marker: bytes, deadline: float) -> None:
    seen = b""
    while marker not in seen:
        if time.monotonic() > deadline:
            raise BenchError(f"{marker!r} never came back; got {seen[-500:]!r}")
        try:
            seen += os.read(master, 4096)
        except OSError as e:
            raise BenchError(f"the terminal closed before {marker!r}: {e}; got "
                             f"{seen[-500:]!r}") from None


def echo_ms(master: int, n: int) -> list[float]:
    """Write one byte, block until it is read back; n times after WARMUP, in ms."""
    times = []
    for i in range(WARMUP + n):
        key = bytes([ord("a") + i % 26])
        t0 = time.perf_counter_ns()
        os.write(master, key)
        got = os.read(master, 64)
        t1 = time.perf_counter_ns()
        if got != key:
            raise BenchError(f"typed {key!r}, the terminal gave back {got!r}")
        if i >= WARMUP:
            times.append((t1 - t0) / 1e6)
    return times


def _on_pty(argv: list[str], env: dict[str, str] | None,
            measure: Callable[[int], list[float]], ready: bytes | None) -> list[float]:
    """Run argv with a new pty's slave as its terminal and `measure` on the master."""
    master, slave = _pty()
    # Its own session, the pty its controlling terminal (as a terminal emulator starts a
    # shell), so that the closing Ctrl-C reaches the foreground program.
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    try:
        if ready is not None:
            _read_until(master, ready, time.monotonic() + WAIT_S)
        return measure(master)
    finally:
        os.write(master, b"\x03")   # Ctrl-C: ends cat (and the run, and sbx with it)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(master)


def through_sbx(url: str, token: str | None, image: str, n: int) -> list[float]:
    env = {**os.environ, "SANDBOXD_URL": url}
    if token:
        env["SANDBOXD_TOKEN"] = token
    argv = [sys.executable, "-c", SBX, "run", "-it", image, "sh", "-c", REMOTE]
    return _on_pty(argv, env, lambda m: echo_ms(m, n), READY)


def bare(n: int) -> list[float]:
    """The same program on a local pty: what a keystroke's echo costs without sbx."""
    return _on_pty(["sh", "-c", REMOTE], None, lambda m: echo_ms(m, n), READY)


def figures(sbx_ms: list[float], bare_ms: list[float]) -> dict[str, object]:
    fig: dict[str, object] = {
        "echoes": len(sbx_ms),
        "sbx_median_ms": round(median(sbx_ms), 3),
        "sbx_p99_ms": round(percentile(sbx_ms, 99), 3),
        "bare_median_ms": round(median(bare_ms), 3),
        "bare_p99_ms": round(percentile(bare_ms, 99), 3),
    }
    fig["median_ratio"] = round(median(sbx_ms) / median(bare_ms), 1)
    fig["p99_ratio"] = round(percentile(sbx_ms, 99) / percentile(bare_ms, 99), 1)
    fig["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.tty", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(ap)
    ap.add_argument("--echoes", type=int, default=DEFAULT_ECHOES,
                    help=f"timed keystrokes, after {WARMUP} untimed")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.echoes < 1:
        ap.error("--echoes needs at least 1")
    if args.url and not args.image:
        ap.error("--url needs --image (a busybox image reference the service can pull)")
    stop_on_sigterm()
    try:
        if args.spawn:
            with spawned(1, min_idle=1) as svc:
                sbx_ms = through_sbx(svc.url, args.token, svc.image, args.echoes)
        else:
            sbx_ms = through_sbx(check_loopback(args.url), args.token, args.image,
                                 args.echoes)
        bare_ms = bare(args.echoes)
    except (LoadTestError, BenchError) as e:
        print(f"loadtest.tty failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest.tty interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    emit(figures(sbx_ms, bare_ms), args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
