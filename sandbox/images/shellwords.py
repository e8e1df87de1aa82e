"""The word processing a Dockerfile instruction's arguments get when it is dispatched, as
BuildKit's shell lexer does it: quotes, the escape character and variables from the
environment of the step (the image's Env, and a build's ARGs).

- `'...'` is taken literally; `"..."` too, except `$` and the escape character before `"`,
  `$` or itself. Outside quotes the escape character takes the next character literally.
- `$NAME`, `${NAME}`; `${NAME:-word}` / `${NAME-word}` (word if unset or empty / unset),
  `${NAME:+word}` / `${NAME+word}` (word if set and non-empty / set), `${NAME:?msg}` /
  `${NAME?msg}` (an error), `${NAME#pat}`, `${NAME##pat}`, `${NAME%pat}`, `${NAME%%pat}`
  (shortest or longest prefix or suffix removed; `*` and `?` wildcards),
  `${NAME/pat/repl}` and `${NAME//pat/repl}`. An unset variable is empty; `$` before
  anything that is not a name is itself.

`word` keeps the whitespace between words (ENV, LABEL, USER, WORKDIR, ...); `words` splits
after expansion, quoted whitespace kept (EXPOSE, and a build's COPY sources).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sandbox.errors import ImageError

# POSIX special parameters: `$` and one of these is a name of its own (always unset here).
_SPECIAL = frozenset("@*#?-$!0")


def word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """`text` with quotes and escapes removed and variables expanded, as one word."""
    return _Lexer(text, env, escape).run()[0]


def words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """`text` expanded, then split at unquoted whitespace."""
    return _Lexer(text, env, escape).run()[1]


class _Words:
    """The words of a text as it is read: whitespace that came from a variable or stood
    unquoted splits; quoted text and escaped characters never do."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.word: list[str] = []   # its pieces: joined once, however long the text
        self.in_word = False

    def char(self, ch: str) -> None:
        if not ch.isspace():
            self.raw(ch)
        elif self.in_word and any(self.word):
            self.done.append("".join(self.word))
            self.word, self.in_word = [], False

    def text(self, s: str) -> None:
        for ch in s:
            self.char(ch)

    def raw(self, s: str) -> None:
        self.word.append(s)
        self.in_word = True

    def finish(self) -> list[str]:
        if any(self.word):
            self.done.append("".join(self.word))
        return self.done


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text = text
        self.env = env
        self.escape = escape
        self.pos = 0

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _next(self) -> str:
        ch = self._peek()
        self.pos += bool(ch)
        return ch

    def run(self) -> tuple[str, list[str]]:
        try:
            return self._until("", raw_escapes=False)
        except ImageError as e:
            raise ImageError(f"cannot expand {_show(self.text)}: {e}") from None

    def _until(self, stop: str, *, raw_escapes: bool) -> tuple[str, list[str]]:
        """Read up to `stop` (consumed; "" reads to the end): (text, its words)."""
        out: list[str] = []
        split = _Words()
        while (ch := self._peek()) != "":
            if stop and ch == stop:
                self.pos += 1
                return "".join(out), split.finish()
            if ch == "$":
                value = self._dollar()
                out.append(value)
                split.text(value)
            elif ch == "'":
                value = self._single_quoted()
                out.append(value)
                split.raw(value)
            elif ch == '"':
                value = self._double_quoted(raw_escapes)
                out.append(value)
                split.raw(value)
            else:
                self.pos += 1
                if ch == self.escape:
                    if raw_escapes:
                        out.append(ch)
                        split.raw(ch)
                    ch = self._next()
                    if not ch:
                        break  # a lone escape character at the end is dropped
                    split.raw(ch)
                else:
                    split.char(ch)
                out.append(ch)
        if stop:
            raise ImageError(f"no closing {stop!r}")
        return "".join(out), split.finish()

    def _single_quoted(self) -> str:
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end < 0:
            raise ImageError("a single quote is not closed; close it, or escape it with "
                             f"{self.escape}")
        value, self.pos = self.text[self.pos:end], end + 1
        return value

    def _double_quoted(self, raw_escapes: bool) -> str:
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self._peek()
            if not ch:
                raise ImageError("a double quote is not closed; close it, or escape it "
                                 f"with {self.escape}")
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            self.pos += 1
            if ch == self.escape:
                if raw_escapes:
                    out.append(ch)
                if self._peek() in ('"', "$", self.escape):
                    ch = self._next()
            out.append(ch)

    def _name(self) -> str:
        start = self.pos
        ch = self._peek()
        if ch.isdecimal():  # positional parameters: never set here
            while self._peek().isdecimal():
                self.pos += 1
            return self.text[start:self.pos]
        if ch in _SPECIAL and ch:
            self.pos += 1
            return ch
        while (ch := self._peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
            self.pos += 1
        return self.text[start:self.pos]

    def _dollar(self) -> str:
        self.pos += 1
        if self._peek() != "{":
            name = self._name()
            return self.env.get(name, "") if name else "$"
        self.pos += 1
        if self._peek() in ("{", "}", ":"):
            raise ImageError(f"bad substitution: '${{' needs a variable name; write {self.escape}$ "
                             "for a literal dollar sign")
        name = self._name()
        op = self._next()
        if op == "}":
            return self.env.get(name, "")
        if not op:
            raise ImageError(f"'${{{name}' is not closed by '}}'")
        if op == "/":
            return self._replace(name)
        colon = op == ":"
        if colon:
            op = self._next()
        if op not in ("-", "+", "?", "#", "%"):
            raise ImageError(f"'${{{name}{':' if colon else ''}{op}' uses a modifier Docker "
                             "does not have; use :-, -, :+, +, :?, ?, #, ##, %, %% or /")
        arg, _ = self._closing("}", raw_escapes=op in "#%")
        value = self.env.get(name)
        missing = value is None or (colon and value == "")
        if op == "-":
            return arg if missing else value or ""
        if op == "+":
            return "" if missing else arg
        if op == "?":
            if missing:
                raise ImageError(f"{name}: " + (arg or ("is not allowed to be unset"
                                                        if value is None
                                                        else "is not allowed to be empty")))
            return value or ""
        greedy = arg.startswith(op)
        pattern = arg[1:] if greedy else arg
        if op == "#":
            return _trim_prefix(pattern, value or "", greedy)
        return _trim_prefix(_reverse_pattern(pattern), (value or "")[::-1], greedy)[::-1]

    def _closing(self, stop: str, *, raw_escapes: bool) -> tuple[str, list[str]]:
        try:
            return self._until(stop, raw_escapes=raw_escapes)
        except ImageError:
            if self.pos >= len(self.text):
                raise ImageError(f"a '${{' is not closed by '{stop}'") from None
            raise

    def _replace(self, name: str) -> str:
        every = self._peek() == "/"
        self.pos += every
        pattern, _ = self._closing("/", raw_escapes=True)
        replacement, _ = self._closing("}", raw_escapes=True)
        regex = _pattern_regex(pattern, greedy=True, anchored=False)
        value = self.env.get(name, "")
        return regex.sub(lambda _: replacement, value, count=0 if every else 1)


def _pattern_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A shell pattern (`*`, `?`, backslash escapes; no brackets) as a regular expression."""
    out = ["^"] if anchored else []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(".*" if greedy else ".*?")
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            nxt = pattern[i:i + 1]
            if nxt in ("}", "/"):
                continue  # escaped so it would not end the ${...}: not part of the pattern
            if nxt not in ("*", "?", "\\"):
                raise ImageError(f"invalid escape '\\{nxt}' in the pattern {_show(pattern)}")
            out.append(re.escape(nxt))
            i += 1
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    found = _pattern_regex(pattern, greedy=greedy, anchored=True).match(value)
    return value[found.end():] if found else value


def _reverse_pattern(pattern: str) -> str:
    """The pattern backwards with each escape kept before what it escapes: suffixes are
    trimmed as prefixes of the reversed value."""
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        step = 2 if pattern[i] == "\\" and i + 1 < len(pattern) else 1
        tokens.append(pattern[i:i + step])
        i += step
    return "".join(reversed(tokens))


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")

