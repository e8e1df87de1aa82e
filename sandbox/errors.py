"""Errors the sandbox layer raises. Each message says what went wrong and what to do."""


class SandboxError(Exception):
    """Base class for every error sandboxd raises on purpose."""


class PolicyError(SandboxError):
    """A policy (seccomp profile or run profile) is invalid or cannot be compiled."""


class CgroupError(SandboxError):
    """A cgroup could not be created, configured, read or removed."""


class RuntimeSetupError(SandboxError):
    """A container could not be created (namespaces, id mapping, mounts, pivot_root)."""


class RuntimeRestarting(RuntimeSetupError):
    """The spawner process died and is being started again (spawnerclient's supervision):
    no container can be made until it is back, and those it had made died with it. The
    same request succeeds once it is back, in about `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContainerGoneError(SandboxError):
    """The container's init died or its control socket closed."""


class ImageError(SandboxError):
    """An image operation failed: a reference, a registry, a manifest, a blob or a layer."""


class InvalidReference(ImageError):
    """An image reference (or a digest) does not parse."""


class RegistryError(ImageError):
    """A registry answered with an error or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class AuthError(RegistryError):
    """The registry refused our credentials, or we have none where it wants some."""


class WrongPlatform(ImageError):
    """The image is built for an operating system or architecture this host does not run."""


class NotFound(ImageError):
    """An image, manifest, tag or blob does not exist (locally or in the registry)."""


class ManifestError(ImageError):
    """A manifest, index or image config is malformed, too large or of the wrong type."""


class DigestMismatch(ImageError):
    """Content does not hash to the digest (or size) it was asked for under."""


class LayerError(ImageError):
    """A layer tar is malformed, unsafe, or over a size or entry cap."""


class ImageInUse(ImageError):
    """An image a live container uses cannot be removed (without force)."""


class StoreFull(SandboxError):
    """A store's filesystem (the image store, the file cache) has no space or quota left
    for what was being written; `path` is the store. The message says what to free, and is
    for any tenant: `detail` (the store's path, its filesystem's room, what fills it, over
    every tenant) is for the operator's log. Nothing half-written is left behind."""

    def __init__(self, message: str, *, path: str, detail: str) -> None:
        super().__init__(message)
        self.path = path
        self.detail = detail


class CapacityError(SandboxError):
    """The engine is at its configured container cap; retry shortly."""


class AtQuota(CapacityError):
    """The tenant holds as many of something as its quota allows (max_sessions, max_files):
    waiting does not help, deleting some does."""


class Forbidden(SandboxError):
    """The caller may not do this (e.g. change a name the operator shares with everyone)."""


class Busy(SandboxError):
    """What the request acts on is in a use that rules it out now (a session with runs in
    progress cannot be committed); the same request may succeed later."""


class QuotaExceeded(SandboxError):
    """The tenant's quota would be exceeded (e.g. the bytes its images use)."""


class BuildFailed(SandboxError):
    """A build's step failed (a RUN exited non-zero, a COPY found no source, ...): `line` is
    its Dockerfile line and `step` its number, when known; the message names both."""

    def __init__(self, message: str, *, line: int | None = None,
                 step: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.step = step
