"""Tenants: whose names, sessions, warm containers and quotas a request sees and makes.

Every API token is a tenant; a service without tokens has one, LOCAL. Content (blobs and
unpacked layers, addressed by their digests) is stored once and shared; what names it, what
runs it and what it costs is the tenant's own. A tenant uses stored content only after it
has shown it holds that content itself (fetched from a registry and verified, or uploaded),
so knowing another tenant's digests gives nothing. The operator may share names with every
tenant (`[images] public`): those are kept under PUBLIC.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sandbox.errors import InvalidReference, PolicyError
from sandbox.reference import Reference, parse

PUBLIC = ""   # the namespace of the operator's shared names; no tenant's id is empty


@dataclass(frozen=True)
class Tenant:
    id: str
    max_sessions: int | None = None        # sessions kept at once; None: no cap
    max_image_bytes: int | None = None     # blobs + unpacked layers its names use

    def __post_init__(self) -> None:
        if not self.id:
            raise PolicyError("a tenant needs a non-empty id")

    def __str__(self) -> str:
        return self.id


LOCAL = Tenant("local")


@dataclass(frozen=True)
class PublicNames:
    """Image names the operator shares with every tenant: exact references, or patterns
    with `*` over the normalised reference (`docker.io/library/python:*`)."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: list[str], where: str = "images.public") -> PublicNames:
        out = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, str) or not entry.strip():
                raise PolicyError(f"{where}[{i}]: expected an image reference or a pattern")
            if "*" in entry or "?" in entry or "[" in entry:
                if "/" not in entry.split("*")[0]:
                    raise PolicyError(f"{where}[{i}]: a pattern must start with the registry "
                                      "and repository, e.g. 'docker.io/library/python:*'")
                out.append(entry)
            else:
                try:
                    out.append(str(parse(entry)))
                except InvalidReference as e:
                    raise PolicyError(f"{where}[{i}]: {e}") from None
        return cls(tuple(out))

    def covers(self, ref: Reference) -> bool:
        name = str(ref)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
