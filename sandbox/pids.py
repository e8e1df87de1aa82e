"""Whether a process still lives: what temp files, leases and container records are
checked against to tell a live owner from one that crashed."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive all the same
        return True
    return True
