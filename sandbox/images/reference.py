"""Image references, parsed and normalised as Docker's distribution/reference does.

`parse` follows `ParseDockerRef`: familiar names gain `docker.io/` and `library/`, a reference
with both a tag and a digest keeps only the digest, and one with neither gets the tag `latest`.
The grammar is that of `reference.go`/`regexp.go`; only the error messages are ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from sandbox.errors import InvalidReference
from sandbox.images import digests

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_LEGACY_HUB = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"

# Docker caps the repository path (not the domain) at 255 characters. The domain cap and the
# input cap are ours: no resolvable host name is longer, and they bound the regex work on
# hostile input without rejecting any reference Docker could pull.
PATH_MAX = 255
DOMAIN_MAX = 255
INPUT_MAX = 1024

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_COMPONENT_RE = re.compile(_COMPONENT)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# IPv6 hosts are hex and colons in brackets: zones (`%eth0`) and embedded IPv4 are not allowed.
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
# Go's \w is ASCII only.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
_BAD_CHAR_RE = re.compile(r"[^\x21-\x7e]")

_EXAMPLES = ("valid references look like 'python:3.12-slim', 'ghcr.io/org/app:1.0' or "
             "'registry.local:5000/team/app@sha256:<64 hex digits>'")


def _invalid(text: str, problem: str) -> InvalidReference:
    return InvalidReference(f"invalid image reference {text[:300]!r}: {problem}; {_EXAMPLES}")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: `domain/path` plus a tag or a digest (a digest wins)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        # References are also rebuilt from stored metadata; never let a malformed one exist.
        shown = f"{self.domain}/{self.path}"
        if not isinstance(self.domain, str) or not _valid_domain(self.domain):
            raise _invalid(shown, f"{self.domain!r} is not a registry host[:port]")
        if not isinstance(self.path, str) or _path_problem(self.path) is not None:
            raise _invalid(shown, f"{self.path!r} is not a repository path")
        if self.tag is not None and (not isinstance(self.tag, str)
                                     or not _TAG_RE.fullmatch(self.tag)):
            raise _invalid(shown, f"{self.tag!r} is not a tag (letters, digits, '_', '.', "
                                  "'-', at most 128, not starting with '.' or '-')")
        if self.digest is not None:
            digests.validate(self.digest, f"digest of {shown}")
        if self.domain == _LEGACY_HUB or (self.domain == DOCKER_HUB and "/" not in self.path):
            raise _invalid(shown, "not normalised; build references with parse()")

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self) -> str:
        """The host to send registry API requests to (`docker.io` is only a naming domain)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def identifier(self) -> str:
        """What goes after `/manifests/` in the registry API."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        """This repository pinned to `digest` (the tag is dropped, as `parse` does)."""
        return replace(self, tag=None, digest=digest)

    def with_tag(self, tag: str) -> Reference:
        """This repository at `tag` (any digest is dropped: a tag is resolved afresh)."""
        return replace(self, tag=tag, digest=None)

    def _suffix(self) -> str:
        if self.digest:
            return "@" + self.digest
        return ":" + self.tag if self.tag else ""

    def __str__(self) -> str:
        return self.repository + self._suffix()

    def familiar(self) -> str:
        """Docker's short form: `python:3.12`, `org/app:1`; other registries in full."""
        if self.domain != DOCKER_HUB:
            return str(self)
        name = self.path
        rest = name.removeprefix(_OFFICIAL_PREFIX)
        if rest != name and "/" not in rest:
            name = rest
        return name + self._suffix()


def parse(text: str) -> Reference:
    """Parse a reference as `docker pull` does, or raise InvalidReference saying why not."""
    if not isinstance(text, str):
        raise InvalidReference(f"an image reference must be a string, not {type(text).__name__}")
    if not text:
        raise _invalid(text, "it is empty")
    if len(text) > INPUT_MAX:
        raise _invalid(text, f"it is {len(text)} characters long, more than any valid "
                             f"reference ({INPUT_MAX})")
    bad = _BAD_CHAR_RE.search(text)
    if bad:
        raise _invalid(text, f"it contains {bad.group()!r} at position {bad.start()}; "
                             "whitespace, control and non-ASCII characters are not allowed")
    if _IDENTIFIER_RE.fullmatch(text):
        raise _invalid(text, "a 64-character hexadecimal string is an image ID, not a "
                             "repository name; to pin a digest write 'name@sha256:<hex>'")

    if "://" in text:
        raise _invalid(text, "write it without a URL scheme ('https://')")
    rest, at, digest = text.partition("@")
    if at:
        if not digest:
            raise _invalid(text, "'@' must be followed by a digest such as 'sha256:<64 hex>'")
        if "@" in digest:
            raise _invalid(text, "it contains more than one '@'")
        _validate_digest(text, digest)

    if rest.startswith("[") and "/" not in rest:
        raise _invalid(text, "a registry host must be followed by '/' and a repository path, "
                             "as in '[::1]:5000/app'")
    name, tag = _split_tag(text, rest)
    domain, path = _split_domain(text, name)
    if tag is not None and digest:
        tag = None  # ParseDockerRef: the digest identifies the content; the tag is dropped
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest or None)


def _validate_digest(text: str, digest: str) -> None:
    if digest.startswith("sha256:") and not digests.is_digest(digest):
        # digests.validate would blame the algorithm; the hex is what is wrong here.
        raise _invalid(text, f"{digest[:100]!r} is not a digest: 'sha256:' must be followed by "
                             "64 lowercase hex digits")
    digests.validate(digest, f"digest in image reference {text[:300]!r}")


def _split_tag(text: str, rest: str) -> tuple[str, str | None]:
    """Split `name[:tag]`: a tag is what follows a ':' after the last '/'."""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon <= slash:
        return rest, None
    name, tag = rest[:colon], rest[colon + 1:]
    if not tag:
        raise _invalid(text, "':' must be followed by a tag such as 'latest'")
    if len(tag) > 128:
        raise _invalid(text, f"the tag is {len(tag)} characters long; at most 128 are allowed")
    if not _TAG_RE.fullmatch(tag):
        raise _invalid(text, f"{tag!r} is not a valid tag: use letters, digits, '_', '.' and "
                             "'-', not starting with '.' or '-'")
    return name, tag


def _split_domain(text: str, name: str) -> tuple[str, str]:
    """splitDockerDomain, then validation of both halves."""
    if not name:
        raise _invalid(text, "the repository name is missing")
    if name.endswith("/"):
        raise _invalid(text, "it ends with '/'; a repository name is needed after it")
    first, slash, remainder = name.partition("/")
    if not slash:
        domain, path = DOCKER_HUB, _OFFICIAL_PREFIX + name
    elif first == _LEGACY_HUB:
        domain, path = DOCKER_HUB, remainder
    elif first == "localhost" or any(c in first for c in ".:") or first.lower() != first:
        domain, path = first, remainder
    else:
        domain, path = DOCKER_HUB, name
    if domain == DOCKER_HUB and "/" not in path:
        path = _OFFICIAL_PREFIX + path

    if not _valid_domain(domain):
        raise _invalid(text, _domain_problem(domain))
    problem = _path_problem(path)
    if problem:
        raise _invalid(text, problem)
    return domain, path


def _valid_domain(domain: str) -> bool:
    return len(domain) <= DOMAIN_MAX and _DOMAIN_RE.fullmatch(domain) is not None


def _domain_problem(domain: str) -> str:
    if len(domain) > DOMAIN_MAX:
        return f"the registry host is longer than {DOMAIN_MAX} characters"
    if "%" in domain:
        return (f"{domain!r}: IPv6 zone identifiers ('%eth0') are not allowed in a reference; "
                "use a routable address such as '[fd00::1]:5000'")
    if domain.startswith("[") or domain.count(":") > 1:
        return (f"{domain!r} is not a registry host: an IPv6 address must be written in "
                "brackets, hex digits and ':' only, as in '[::1]:5000'")
    host, _, port = domain.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return f"{domain!r}: the port {port!r} after ':' must be a number, as in 'host:5000'"
    return (f"{host!r} is not a registry host name: use letters, digits, '-' and '.', "
            "with no '-' or '.' at the start or end of a label")


def _path_problem(path: str) -> str | None:
    if _PATH_RE.fullmatch(path):
        if len(path) > PATH_MAX:
            return f"the repository path is {len(path)} characters long; at most {PATH_MAX}"
        return None
    if path.lower() != path and _PATH_RE.fullmatch(path.lower()):
        return f"repository name {path!r} must be lowercase"
    if not path or path.endswith("/"):
        return "a repository path is missing after the '/'"
    if "//" in path or path.startswith("/"):
        return "it contains an empty path component ('//')"
    for component in path.split("/"):
        if not _COMPONENT_RE.fullmatch(component):
            return (f"{component!r} is not a valid repository path component: use lowercase "
                    "letters and digits, joined by single '.', '_', '__' or runs of '-'")
    return f"{path!r} is not a valid repository path"
