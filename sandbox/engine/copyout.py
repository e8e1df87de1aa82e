"""Files a run leaves that its caller wants back (`copy_out`, `copy_out_cached`), read from
the container after the run ends and before it is reset: inline, or stored in the tenant's
file cache (compile once, then feed the binary to every case by its id).

A path that cannot be copied (missing, a directory, too large, over a quota) is an error
entry beside the others: the run's own result stands."""

from __future__ import annotations

from sandbox.engine.filecache import FileCache
from sandbox.engine.specs import CopiedOut, RunSpec
from sandbox.errors import SandboxError
from sandbox.runtime import files
from sandbox.runtime.container import Container
from sandbox.tenants import Tenant

MAX_COPY_OUT_BYTES = 64 << 20    # a run's inline copy_out in all (each file too)


def wanted(spec: RunSpec) -> bool:
    return bool(spec.copy_out or spec.copy_out_cached)


async def copy_out(container: Container, spec: RunSpec, tenant: Tenant,
                   cache: FileCache) -> CopiedOut:
    out = CopiedOut()
    left = MAX_COPY_OUT_BYTES
    for path in spec.copy_out:
        try:
            async with files.get_path(container, path, max_bytes=left) as got:
                if got.kind != "file":
                    out.errors[path] = _not_a_file(path)
                    continue
                out.files[path] = await got.read()
                left -= len(out.files[path])
        except SandboxError as e:
            out.errors[path] = str(e)
    for path in spec.copy_out_cached:
        try:
            async with files.get_path(container, path,
                                      max_bytes=cache.config.max_file_bytes) as got:
                if got.kind != "file":
                    out.errors[path] = _not_a_file(path)
                    continue
                out.cached[path] = await cache.put(tenant, got.chunks)
        except SandboxError as e:
            out.errors[path] = str(e)
    return out


def _not_a_file(path: str) -> str:
    return (f"{path} is a directory: copy_out takes regular files (a session copies a "
            "directory out as a tar: GET /v1/containers/{id}/files?path=...)")
