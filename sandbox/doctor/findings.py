"""What a check found: one finding per thing looked at, and the report they make together."""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass
from typing import Any


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"  # runs work, with less than sandboxd can give (weaker limits, slower)
    FAIL = "fail"  # runs (or the service) cannot work until it is fixed
    SKIPPED = "skipped"  # could not be looked at (nothing to look at, or a check before failed)


@dataclass(frozen=True)
class Finding:
    check: str  # a short stable name, e.g. "userns", for automation
    level: Level
    message: str  # what was found, and what it costs when it is not ok
    fix: str | None = None  # the exact line(s) that fix it; who runs them when it matters

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level.value, "message": self.message,
                "fix": self.fix}


@dataclass(frozen=True)
class Report:
    user: str
    uid: int
    in_kubernetes: bool
    findings: tuple[Finding, ...]

    def count(self, level: Level) -> int:
        return sum(f.level is level for f in self.findings)

    @property
    def exit_status(self) -> int:
        """0 when nothing blocks runs (warnings included), 1 otherwise."""
        return 1 if self.count(Level.FAIL) else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_status == 0,
            "user": self.user,
            "uid": self.uid,
            "kubernetes": self.in_kubernetes,
            "failures": self.count(Level.FAIL),
            "warnings": self.count(Level.WARN),
            "findings": [f.as_dict() for f in self.findings],
        }

    def text(self) -> str:
        """For a person: a line per finding, each problem's fix below it."""
        where = " in a Kubernetes pod" if self.in_kubernetes else ""
        lines = [f"sandboxd doctor: running as {self.user} (uid {self.uid}){where}"]
        width = max(len(f.check) for f in self.findings)
        indent = " " * (width + 8)
        for f in self.findings:
            # Messages wrap between words only (a path stays whole, however long or
            # hyphenated, to be copied); fixes stay whole too.
            lines.extend(textwrap.wrap(f"{_MARK[f.level]:<5} {f.check:<{width}}  {f.message}",
                                       WIDTH, subsequent_indent=indent,
                                       break_long_words=False, break_on_hyphens=False))
            if f.fix and f.level in (Level.WARN, Level.FAIL):
                lines.extend(f"{indent}fix: {line}" for line in f.fix.splitlines())
        failures, warnings = self.count(Level.FAIL), self.count(Level.WARN)
        lines.append(f"{_count(failures, 'problem')} blocking runs, "
                     f"{_count(warnings, 'warning')}")
        return "\n".join(lines)


WIDTH = 100  # of a message's lines in the text report
_MARK = {Level.OK: "ok", Level.WARN: "warn", Level.FAIL: "FAIL", Level.SKIPPED: "skip"}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
