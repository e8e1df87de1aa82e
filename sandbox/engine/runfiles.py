"""A run's files into its container: a cached file (FileSpec.cached) is bound read-only from
the file cache's blob, with no copy whatever its size; the rest are copied in (put_file)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Sequence

from sandbox.engine.filecache import FileCache
from sandbox.engine.specs import FileSpec
from sandbox.errors import SandboxError
from sandbox.runtime import files
from sandbox.runtime.container import BindError, CachedBind, Container

Bound = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def executable(mode: int) -> bool:
    """Whether a file given with `mode` is bound as its executable variant: any exec bit."""
    return bool(mode & 0o111)


async def place(container: Container, specs: Sequence[FileSpec], cache: FileCache, *,
                uid: int | None, gid: int | None, exec_follows: bool = False) -> Bound:
    """`specs` into `container`, owned by `uid`/`gid` (the run's user): copies first, in
    order, then every cached file in one bind request (a bind at a copy's path goes over
    it). Returns what awaits the binds' answer: with `exec_follows` the caller sends the
    run's exec before awaiting it, with no suspension between (init refuses that exec if a
    bind failed; Container.send_bind), which saves a round trip per run; without, it has
    been awaited already. A cached file gone from the cache since its entry was looked up
    is NotFound; a path that cannot take it, PolicyError (as for a copy); a blob init could
    not take for another reason, SandboxError with init's reason."""
    binds: list[CachedBind] = []
    bound_specs: list[FileSpec] = []
    for f in specs:
        if f.cached is None:
            await files.put_file(container, f.path, f.content, f.mode, uid=uid, gid=gid)
            continue
        x = executable(f.mode)
        name = cache.bindable(f.cached.id, x)
        if name is None:  # the first executable bind of this content: one copy, kept
            name = await asyncio.to_thread(cache.make_executable, f.cached.id)
        binds.append(CachedBind(f.path, name, x))
        bound_specs.append(f)
    if not binds:
        return _nothing
    answer = files.bind_files(container, binds, uid=uid, gid=gid, exec_follows=exec_follows)

    async def bound() -> None:
        try:
            await answer()
        except BindError as e:
            cached = bound_specs[e.index].cached
            assert cached is not None
            if e.error.errno == errno.ENOENT:  # deleted or expired since it was looked up
                raise cache.missing(cached.id) from e
            # Not the client's doing: init's own reason, for the operator to act on.
            raise SandboxError(f"cannot bind cached file {cached.id} at "
                               f"{bound_specs[e.index].path}: {e.error.strerror}") from e

    if exec_follows:
        return bound
    await bound()
    return _nothing
