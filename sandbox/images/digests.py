"""Content digests (`sha256:<64 hex>`): the only strings that may name a file in the store."""

from __future__ import annotations

import hashlib
import re

from sandbox.errors import InvalidReference

# Strict: a digest names files under blobs/ and layers/, so nothing but lowercase hex passes.
_SHA256 = re.compile(r"sha256:[a-f0-9]{64}")
# What the reference grammar accepts (any registered algorithm); we can only verify sha256.
_ANY = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")


def validate(digest: object, where: str = "digest") -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise InvalidReference."""
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        shown = repr(digest)[:100]
        if isinstance(digest, str) and _ANY.fullmatch(digest) and not digest.startswith(
                "sha256:"):
            raise InvalidReference(f"{where}: {shown} uses an algorithm sandboxd cannot verify; "
                                   "only sha256 digests are supported")
        raise InvalidReference(f"{where}: {shown} is not a digest; expected 'sha256:' and 64 "
                               "lowercase hex digits")
    return digest


def hex_part(digest: str) -> str:
    """The hex of a validated digest: safe to use as a file name."""
    return validate(digest)[len("sha256:"):]


def of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))
