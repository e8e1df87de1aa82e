"""Errors the sandbox layer raises. Each message says what went wrong and what to do."""


class SandboxError(Exception):
    """Base class for every error sandboxd raises on purpose."""


class PolicyError(SandboxError):
    """A policy (seccomp profile or run profile) is invalid or cannot be compiled."""


class CgroupError(SandboxError):
    """A cgroup could not be created, configured, read or removed."""


class RuntimeSetupError(SandboxError):
    """A container could not be created (namespaces, id mapping, mounts, pivot_root)."""


class ContainerGoneError(SandboxError):
    """The container's init died or its control socket closed."""
