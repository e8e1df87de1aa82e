"""The image names the operator shares with every tenant (`[images] public`).

They live in a namespace of their own, PUBLIC: every tenant resolves, lists and runs them,
none may tag, import over or remove them, and they count against no tenant's quota.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sandbox.errors import InvalidReference, PolicyError
from sandbox.images.reference import Reference, parse

PUBLIC = ""   # the namespace of the operator's shared names; no tenant's id is empty


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
