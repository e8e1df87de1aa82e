"""Tenants: whose names, sessions, warm containers and quotas a request sees and makes.

Every API token is a tenant; a service without tokens has one, LOCAL. Content (blobs and
unpacked layers, addressed by their digests) is stored once and shared; what names it, what
runs it and what it costs is the tenant's own. A tenant uses stored content only after it
has shown it holds that content itself (fetched from a registry and verified, or uploaded),
so knowing another tenant's digests gives nothing. The operator may share names with every
tenant (`[images] public`, sandbox/images/public.py). Cached files (engine/filecache.py) go
the same way: one blob per content, reached only through the entry a tenant made by storing
that content itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.errors import PolicyError


@dataclass(frozen=True)
class Tenant:
    id: str
    max_sessions: int | None = None        # sessions kept at once; None: no cap
    max_image_bytes: int | None = None     # blobs + unpacked layers its names use
    max_file_bytes: int | None = None      # what its cached files hold (engine/filecache.py)
    max_files: int | None = None           # how many cached files it keeps

    def __post_init__(self) -> None:
        if not self.id:
            raise PolicyError("a tenant needs a non-empty id")

    def __str__(self) -> str:
        return self.id


LOCAL = Tenant("local")
