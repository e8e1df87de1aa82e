"""`.dockerignore` rules as Docker applies them (moby/patternmatcher, its `ignorefile`
reader and `MatchesOrParentMatches`), and the `filepath.Match` patterns COPY sources use.

- A line whose first character is `#` is a comment; the others are trimmed and blank ones
  skipped; `!` makes an exception; each pattern is cleaned as Go's `filepath.Clean` does
  and loses a leading `/` (`/a/b` is `a/b`). A UTF-8 BOM before the first line is dropped.
- Patterns have Go's `filepath.Match` syntax, `*`, `?`, `[a-z]`, `[^a-z]`, `\\` escapes,
  and `**` for any number of directories (`**/*.go`, `dir/**`).
- The last pattern that matches a path or one of its parent directories decides: a
  directory pattern excludes everything below it, and a later exception re-includes what
  it names even below an excluded directory.

Two quirks of moby's are kept: `**` directly followed by a literal tail (`**file`)
matches any path ending in it (`dir/myfile`), and a `[^...]` class also matches `/`.
One differs on purpose: `\\` always escapes the next character as `filepath.Match` does
(moby hands it to Go's regexp, where `\\d` would be a digit class).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sandbox.errors import ImageError

_WILDCARDS = frozenset("*?[")
Matched = tuple[bool, ...]     # per rule: whether it matches a path or a parent of it


class BadPattern(ValueError):
    """A pattern `filepath.Match` refuses; the message says what is wrong with it."""


def clean(path: str) -> str:
    """Go's `filepath.Clean` (on Linux): `.` and empty components gone, `..` resolved
    lexically (never above `/` for a rooted path), "." for an empty result."""
    rooted = path.startswith("/")
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    joined = "/".join(out)
    return "/" + joined if rooted else joined or "."


def has_wildcards(pattern: str) -> bool:
    """Whether a COPY source is a pattern (`*`, `?` or `[` not escaped by `\\`), as
    BuildKit tells."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] in _WILDCARDS:
            return True
        i += 1
    return False


def glob(pattern: str, *, doublestar: bool = False) -> re.Pattern[str]:
    """A regex matching what `filepath.Match(pattern, path)` matches (use `fullmatch`);
    with `doublestar`, `**` also spans directories as in `.dockerignore`. Raises
    BadPattern."""
    return re.compile(_translate(pattern, doublestar), re.DOTALL)


def _translate(pattern: str, doublestar: bool) -> str:
    if doublestar and pattern.startswith("**") and pattern[2:3] not in ("", "/") \
            and not any(c in pattern[2:] for c in "*?[]\\"):
        return ".*" + re.escape(pattern[2:])   # moby's suffix match (`**file`)
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*" and doublestar and pattern[i:i + 1] == "*":
            i += 2 if pattern[i + 1:i + 2] == "/" else 1
            out.append(".*" if i == n else "(?:.*/)?")
        elif c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i == n:
                raise BadPattern("it ends in '\\', which escapes nothing (write '\\\\' for "
                                 "a backslash)")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            cls, i = _char_class(pattern, i)
            out.append(cls)
        else:
            out.append(re.escape(c))
    return "".join(out)


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    """The regex of the class whose `[` is just before `i`, and where it ends."""
    negate = pattern[i:i + 1] == "^"
    i += negate
    ranges: list[str] = []
    while not (pattern[i:i + 1] == "]" and ranges):
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern[i:i + 1] == "-":
            hi, i = _class_char(pattern, i + 1)
            if hi < lo:
                raise BadPattern(f"the range '{lo}-{hi}' is backwards (write '{hi}-{lo}')")
        ranges.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    return "[" + "^" * negate + "".join(ranges) + "]", i + 1


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern):
        raise BadPattern("a '[' is never closed (write '\\[' for a bracket)")
    c = pattern[i]
    if c in "-]":
        raise BadPattern(f"'{c}' stands where a character of a [...] class is expected "
                         f"(write '\\{c}' for the character itself)")
    if c == "\\":
        if i + 1 >= len(pattern):
            raise BadPattern("a '[' is never closed (write '\\[' for a bracket)")
        return pattern[i + 1], i + 2
    return c, i + 1


@dataclass(frozen=True)
class _Rule:
    text: str                      # the cleaned pattern, "!" left off
    regex: re.Pattern[str]
    exception: bool


@dataclass(frozen=True)
class IgnoreRules:
    """The rules of one ignore file; paths are relative to the context root, `/`-separated."""

    rules: tuple[_Rule, ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = ".dockerignore") -> IgnoreRules:
        """Raises ImageError naming `source:LINE` for a pattern Docker would refuse."""
        rules = []
        for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
            line = raw.removesuffix("\r")
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            exception = line.startswith("!")
            pattern = line[1:].strip() if exception else line
            if pattern:
                pattern = clean(pattern)
                if len(pattern) > 1 and pattern.startswith("/"):
                    pattern = pattern[1:]
            elif exception:
                raise ImageError(f"{source}:{number}: '!' alone is not a pattern; write the "
                                 "path to keep after it, e.g. '!README.md'")
            try:
                regex = glob(pattern, doublestar=True)
            except BadPattern as e:
                raise ImageError(f"{source}:{number}: {line!r} is not a valid pattern: {e}"
                                 ) from None
            rules.append(_Rule(pattern, regex, exception))
        return cls(tuple(rules))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def step(self, path: str, parent: Matched | None = None) -> Matched:
        """What matches `path`, given what matches its parent directory (`parent`, from
        the call for it; None at the root): one regex per rule, not one per parent."""
        if parent is None:
            return tuple(bool(r.regex.fullmatch(path)) for r in self.rules)
        return tuple(up or bool(r.regex.fullmatch(path))
                     for r, up in zip(self.rules, parent, strict=True))

    def decide(self, matched: Matched) -> bool:
        """Whether the path `matched` was computed for is excluded."""
        for rule, hit in zip(reversed(self.rules), reversed(matched), strict=True):
            if hit:
                return not rule.exception
        return False

    def excluded(self, path: str) -> bool:
        """Whether `path` is left out of the context (the root never is)."""
        parts = [p for p in clean(path).split("/") if p not in ("", ".")]
        matched: Matched | None = None
        for i in range(len(parts)):
            matched = self.step("/".join(parts[:i + 1]), matched)
        return matched is not None and self.decide(matched)
