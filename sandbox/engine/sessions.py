"""Sessions: containers a tenant keeps. Exec many times, copy files in and out, commit the
container into an image, delete; idle ones expire.

A session belongs to the tenant that made it: a call naming another tenant finds nothing
(NotFound, as for a session that never existed). A commit reads the container's root as
its runs left it, so it waits for no run: with runs in progress it is refused (Busy), and
runs and copies in that arrive meanwhile wait until it is done (Docker pauses the container
for a commit; here nothing is running by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.engine import runfiles
from sandbox.engine.copyout import copy_out, wanted
from sandbox.engine.filecache import FileCache
from sandbox.engine.pool import Pools
from sandbox.engine.specs import NOTHING, RunOutcome, RunSpec
from sandbox.errors import AtQuota, Busy, ContainerGoneError, NotFound, SandboxError
from sandbox.images import Image, ImageService
from sandbox.runtime import files
from sandbox.runtime.container import Container
from sandbox.runtime.diff import layer_tar
from sandbox.runtime.network import NO_NETWORK, NetworkRequest
from sandbox.runtime.output import OutputCallback
from sandbox.runtime.policy import Policy
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.runcontrol import RunControl
from sandbox.tenants import Tenant

# How the engine turns a RunSpec into the request a container runs (Engine._request).
MakeRequest = Callable[[Image, RunSpec, Policy, NetworkRequest], ExecRequest]


@dataclass
class Session:
    id: str
    image: Image
    policy: Policy
    container: Container
    created: float
    last_used: float
    tenant: Tenant                       # whose session it is
    limits: Limits | None = None
    network: NetworkRequest = NO_NETWORK  # begun when the session is made, for its life
    busy: int = 0                        # runs and copies in under way
    # Set while a commit reads the root; what would change the root waits for it.
    committing: asyncio.Event | None = field(default=None, repr=False)

    @property
    def owner(self) -> str:
        return self.tenant.id

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image.digest,
                "names": list(self.image.names), "policy": self.policy.name,
                "created": self.created, "last_used": self.last_used,
                "alive": self.container.alive}

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Around whatever may change the container (a run, a copy in): after any commit
        under way, counted so that no commit starts meanwhile."""
        while self.committing is not None:
            await self.committing.wait()
        self.busy += 1
        self.last_used = time.time()
        try:
            yield
        finally:
            self.busy -= 1
            self.last_used = time.time()


def _ended(sid: str) -> NotFound:
    """A session whose container has died: the expiry sweep deletes it soon."""
    return NotFound(f"container {sid} has ended (killed, out of memory, or the runtime "
                    "restarted): its processes and files are gone; start a new session")


class Sessions:
    """Every tenant's sessions, by id."""

    def __init__(self, pools: Pools, images: ImageService, files: FileCache,
                 make_request: MakeRequest, *, node: str | None = None) -> None:
        self.pools = pools
        # In a cluster an id names the node that holds the session, so that any node can
        # send a request for it there.
        self._id_prefix = "" if node is None else node + "."
        self.images = images
        self.files = files
        self._make_request = make_request
        self._by_id: dict[str, Session] = {}
        self._opening: Counter[str] = Counter()   # sessions being created, per tenant

    def __len__(self) -> int:
        return len(self._by_id)

    async def open(self, image: Image, policy: Policy, tenant: Tenant,
                   limits: Limits | None, network: NetworkRequest = NO_NETWORK) -> Session:
        """A new session of `tenant`, at most `tenant.max_sessions` at once; `image`,
        `policy` and `limits` (the default of its execs) already resolved."""
        cap = tenant.max_sessions
        held = len(self.list(tenant.id)) + self._opening[tenant.id]
        if cap is not None and held >= cap:
            raise AtQuota(f"you have {held} sessions, your maximum (max_sessions): "
                                "delete one (DELETE /v1/containers/{id}) or let idle ones "
                                "expire, then retry")
        self._opening[tenant.id] += 1
        try:
            container = await self.pools.fresh(image, policy, tenant, network)
        finally:
            self._opening[tenant.id] -= 1
        now = time.time()
        sid = self._id_prefix + secrets.token_hex(8)
        session = Session(sid, image, policy, container, now, now, tenant, limits, network)
        self.images.lease(image.digest, f"session-{sid}")
        self._by_id[sid] = session
        return session

    def get(self, sid: str, owner: str | None = None) -> Session:
        """Session `sid`; with `owner` (a tenant id), only if it is that tenant's. Another
        tenant's is NotFound like a missing one: its existence is not theirs to learn."""
        s = self._by_id.get(sid)
        if s is None or (owner is not None and s.owner != owner):
            raise NotFound(f"no container {sid!r}: it was deleted, expired, or never existed")
        return s

    def list(self, owner: str | None = None) -> list[Session]:
        return [s for s in self._by_id.values() if owner is None or s.owner == owner]

    async def exec(self, sid: str, spec: RunSpec, *, on_output: OutputCallback | None = None,
                   control: RunControl | None = None, owner: str | None = None) -> RunOutcome:
        s = self.get(sid, owner)
        if spec.limits is None and s.limits is not None:
            spec = replace(spec, limits=s.limits)
        req = self._make_request(s.image, spec, s.policy, s.network)
        copied = NOTHING
        async with s.changing():
            if not s.container.alive:
                raise _ended(sid)
            # Cached files are bound until the session ends (it is never reset).
            bound = await runfiles.place(s.container, spec.files, self.files, uid=req.uid,
                                         gid=req.gid, exec_follows=True)
            net = s.container.network
            # The session's figures around this exec (those of execs at the same time too).
            before = net.figures() if net is not None else None
            try:
                result = await s.container.exec(req, on_output=on_output, control=control)
            except ContainerGoneError as e:
                raise _ended(sid) from e
            await bound()
            if wanted(spec):
                copied = await copy_out(s.container, spec, s.tenant, self.files)
        traffic = (net.figures().since(before)
                   if net is not None and before is not None else None)
        return RunOutcome(result, False, s.image.digest, copied, network=traffic)

    async def put_file(self, sid: str, path: str, content: bytes, mode: int = 0o644, *,
                       owner: str | None = None) -> None:
        s = self.get(sid, owner)
        uid, gid = self.images.user_ids(s.image)
        async with s.changing():
            if not s.container.alive:
                raise _ended(sid)
            try:
                await files.put_file(s.container, path, content, mode, uid=uid, gid=gid)
            except ContainerGoneError as e:
                raise _ended(sid) from e

    def get_path(self, sid: str, path: str, *, owner: str | None = None
                 ) -> contextlib.AbstractAsyncContextManager[files.Fetched]:
        """A file or a directory's tar from session `sid`, streamed (`files.get_path`):
        `async with sessions.get_path(...) as got`, then iterate `got.chunks`."""
        s = self.get(sid, owner)
        if not s.container.alive:
            raise _ended(sid)
        s.last_used = time.time()
        return files.get_path(s.container, path)

    async def commit(self, sid: str, reference: str, *, tenant: Tenant,
                     changes: Sequence[str] = (), message: str = "",
                     author: str = "") -> Image:
        """A new image of `tenant`, named `reference`: the session's image with one more
        layer holding what its runs changed in the root (tmpfs mounts such as /tmp are not
        part of the root), `changes` (Dockerfile instructions, as `docker commit --change`
        takes) applied to its config. Busy while runs are in progress."""
        s = self.get(sid, tenant.id)
        if s.busy or s.committing is not None:
            what = "a commit" if s.committing is not None else f"{s.busy} runs or copies"
            raise Busy(f"container {sid} has {what} in progress: commit it when they are "
                       "done")
        if not s.container.alive:
            raise _ended(sid)
        s.committing = asyncio.Event()
        s.last_used = time.time()
        try:
            async with contextlib.aclosing(layer_tar(s.container)) as layer:
                return await self.images.commit(s.image, layer, reference, tenant=tenant,
                                                changes=changes, message=message,
                                                author=author)
        finally:
            s.committing.set()
            s.committing = None
            s.last_used = time.time()

    async def delete(self, sid: str, *, owner: str | None = None) -> None:
        self.get(sid, owner)
        s = self._by_id.pop(sid)
        try:
            await self.pools.destroy(s.container)
        finally:
            self.images.release(f"session-{sid}")

    async def expire(self, idle_s: float) -> None:
        """Delete, every so often and for ever, sessions unused for `idle_s` (none while a
        run, a copy or a commit is under way) or whose container died."""
        while True:
            await asyncio.sleep(min(30.0, max(1.0, idle_s / 4)))
            cutoff = time.time() - idle_s
            for sid, s in list(self._by_id.items()):
                idle = not s.busy and s.committing is None
                if (idle and s.last_used < cutoff) or not s.container.alive:
                    with contextlib.suppress(SandboxError):
                        await self.delete(sid)

    async def close(self) -> None:
        for sid in list(self._by_id):
            await self.delete(sid)
