"""Dockerfile builds: a plan's stages run step by step, each step that changes files making
one layer, every such step cached per tenant.

- FROM takes a registry image (pulled as the tenant's, for the build's platform), an
  earlier stage, or `scratch`; the base's ONBUILD triggers run first.
- RUN runs in a container of its own (the build policy: writable root, limits, no
  network), made from the image of the steps so far; what it changed in the root is the
  step's layer (diff.py, as a commit takes it). A run that fails fails the build, its
  output streamed as it comes.
- COPY and ADD make their layer on the host from the build context or an earlier stage's
  files (copylayer.py), without a container.
- The other instructions change only the config (instructions.py); WORKDIR also makes its
  directory when the image has none.

A step's cache key chains its parent's key, the instruction as expanded (with the build
args a RUN sees) and the content of the files it copies: an unchanged rebuild runs nothing,
and a change to one copied file reruns that COPY and what follows. Cached steps are the
tenant's own (the catalog's build_cache); `no_cache` runs every step again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import posixpath
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sandbox.engine.pool import Pools
from sandbox.errors import BuildFailed, ImageError, SandboxError, StoreFull
from sandbox.images import Image, ImageService, Platform, buildplan, platform_serves
from sandbox.images.buildcontext import BuildContext, is_archive
from sandbox.images.buildfiles import Selected, SourceFile
from sandbox.images.copylayer import CopyTarget, copy_tar
from sandbox.images.imageconfig import ImageConfig, build_config, resolve_user
from sandbox.images.instructions import Instruction
from sandbox.images.store.catalog import LayerRecord
from sandbox.images.store.peek import read_from_layers
from sandbox.runtime.diff import layer_tar
from sandbox.runtime.output import Streamed
from sandbox.runtime.policy import Policy
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.tenants import Tenant

Emit = Callable[[dict[str, Any]], Awaitable[None]]
# Resolves a FROM or COPY --from image as the tenant names it (Engine.image).
ResolveImage = Callable[[str, Tenant, Platform | None], Awaitable[Image]]

_COMMENT = "sandboxd.build"
_GATHER = 256 << 10


@dataclass(frozen=True)
class BuildRequest:
    dockerfile: str = "Dockerfile"
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    platform: Platform | None = None


@dataclass
class _State:
    """A stage as its steps have left it."""

    layers: tuple[LayerRecord, ...]
    image: Image | None                  # an image of exactly `layers`: what a RUN starts from
    base: ImageConfig | None             # the base image's config (None: scratch)
    config: buildplan.StageConfig        # the config object, ARGs, SHELL, as steps change it
    platform: Platform
    key: str                             # the cache key of the steps so far
    history: list[dict[str, Any]] = field(default_factory=list)
    made: bool = False                   # a step of it ran (was not all from the cache)


def _key(*parts: object) -> str:
    return "sha256:" + hashlib.sha256(orjson.dumps(parts)).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Builder:
    def __init__(self, pools: Pools, images: ImageService, policy: Policy,
                 resolve_image: ResolveImage, host: Platform) -> None:
        self.pools = pools
        self.images = images
        self.policy = policy
        self.resolve = resolve_image
        self.host = host

    async def build(self, context: BuildContext, req: BuildRequest, tenant: Tenant,
                    emit: Emit) -> Image:
        """Build `req` from `context` as `tenant`; events go to `emit` as they happen (see
        docs/architecture.md, "Builds"). BuildFailed names the failing step."""
        names = self.images.check_tags(req.tags, tenant)
        run = _Run(self, context, req, tenant, emit, f"build-{secrets.token_hex(8)}")
        try:
            final = await run.stages()
            image = await run.final(final, names)
        finally:
            for holder in run.holders:
                self.images.release(holder)
        await emit({"event": "image", "digest": image.digest,
                    "config_digest": image.config_digest, "names": list(image.names)})
        return image


class _Run:
    """One build under way."""

    def __init__(self, builder: Builder, context: BuildContext, req: BuildRequest,
                 tenant: Tenant, emit: Emit, name: str) -> None:
        self.b = builder
        self.context = context
        self.req = req
        self.tenant = tenant
        self.emit = emit
        self.name = name
        self.holders: list[str] = []
        self.step = 0
        self.steps = 0
        self.platform = req.platform or builder.host

    def holder(self) -> str:
        self.holders.append(f"{self.name}-{len(self.holders)}")
        return self.holders[-1]

    # stages

    async def stages(self) -> _State:
        source = self.context.dockerfile(self.req.dockerfile)
        plan = buildplan.plan(source, build_args=self.req.build_args, target=self.req.target,
                              platform=self.platform, build_platform=self.b.host)
        self.steps = plan.steps
        for warning in plan.warnings:
            await self.emit({"event": "warning", "message": warning})
        if plan.unused_args:
            await self.emit({"event": "warning", "message": "build args "
                             f"[{', '.join(plan.unused_args)}] were not consumed by any "
                             "ARG of the stages built"})
        done: dict[int, _State] = {}
        for stage in plan.stages:
            state = await self._from(stage, done)
            for ins in stage.instructions:
                await self._step(ins, state, done)
            done[stage.index] = state
        return done[plan.target]

    async def _begin(self, line: int, text: str, stage: str | None) -> float:
        self.step += 1
        await self.emit({"event": "step", "step": self.step, "steps": self.steps,
                         "stage": stage, "line": line, "instruction": text})
        return time.monotonic()

    async def _end(self, started: float, *, cached: bool, layer: str | None) -> None:
        await self.emit({"event": "step_done", "step": self.step, "cached": cached,
                         "layer": layer, "seconds": round(time.monotonic() - started, 3)})

    async def _from(self, stage: buildplan.Stage, done: Mapping[int, _State]) -> _State:
        started = await self._begin(stage.line, stage.text, stage.name)
        platform = stage.platform or self.platform
        if stage.base_stage is not None:
            parent = done[stage.base_stage]
            state = _State(parent.layers, parent.image, parent.base, parent.config.copy_for(
                stage), parent.platform, _key("stage", parent.key), list(parent.history))
        elif stage.base == "scratch":
            state = _State((), None, None, stage.config(None), platform,
                           _key("scratch", str(platform)))
        else:
            try:
                image = await self.b.resolve(stage.base, self.tenant, platform)
                layers, config = self.b.images.build_base(image, self.tenant)
            except StoreFull:
                raise  # the store's fault, not the Dockerfile's: 507, what to free
            except SandboxError as e:
                raise BuildFailed(f"{stage.where}: FROM {stage.base}: {e}", line=stage.line,
                                  step=self.step) from e
            state = _State(layers, image, config, stage.config(config.raw.get("config")),
                           Platform.parse(image.platform), _key("image", image.digest),
                           [dict(h) for h in config.raw.get("history") or ()])
        await self._end(started, cached=False, layer=None)
        for ins in state.config.triggers():
            await self._step(ins, state, done)
        return state

    # steps

    async def _step(self, ins: Instruction, state: _State, done: Mapping[int, _State]) -> None:
        started = await self._begin(ins.node.start_line, ins.node.original.split("\n")[0],
                                    None)
        try:
            if ins.keyword == "RUN":
                layer, cached = await self._run(ins, state)
            elif ins.keyword in ("COPY", "ADD"):
                layer, cached = await self._copy(ins, state, done)
            else:
                layer, cached = await self._config(ins, state)
        except (BuildFailed, StoreFull):
            raise
        except SandboxError as e:
            said = str(e)
            if not said.startswith(ins.where):
                said = f"{ins.where}: {ins.keyword}: {said}"
            raise BuildFailed(said, line=ins.node.start_line, step=self.step) from e
        await self._end(started, cached=cached, layer=layer)

    async def _config(self, ins: Instruction, state: _State) -> tuple[str | None, bool]:
        text = state.config.normal_form(ins)  # as written: before it changes what it expands
        state.config.apply(ins)
        state.key = _key(state.key, text)
        state.history.append(self._history(text, empty=True))
        # Config alone: "cached" as Docker shows it, when nothing before it had to run.
        if ins.keyword != "WORKDIR":
            return None, not state.made
        workdir = state.config.run.get("WorkingDir") or "/"
        if self.b.images.tree(state.layers).lookup(workdir) is not None:
            return None, not state.made
        # The image lacks the directory: it goes into a layer of its own, owned by the
        # stage's USER, as BuildKit makes it.
        state.history.pop()
        uid, gid = self._ids(state, state.config.run.get("User") or "0")
        made = Selected(posixpath.basename(workdir) or "/", "dir",
                        (SourceFile("", "dir", 0o755, mtime=int(time.time())),))
        target = CopyTarget(workdir, chown=(uid or 0, gid or 0))
        return await self._layer_step(state, _key(state.key, "mkdir"), text,
                                      lambda: copy_tar([made], target,
                                                       self.b.images.tree(state.layers)))

    async def _run(self, ins: Instruction, state: _State) -> tuple[str | None, bool]:
        args = state.config.run_args(ins)
        text = state.config.normal_form(ins)
        key = _key(state.key, text)
        hit = await self._cached(key, state, text)
        if hit is not None:
            return hit, True
        if state.image is None:
            raise BuildFailed(f"{ins.where}: RUN needs files to run: FROM scratch has none "
                              "yet (COPY a static binary in first, then RUN it)",
                              line=ins.node.start_line, step=self.step)
        host = self.b.host
        if not platform_serves(str(state.platform), Platform(host.os, host.architecture)):
            raise BuildFailed(f"{ins.where}: RUN cannot run for {state.platform} on this "
                              f"{host.os}/{host.architecture} machine (sandboxd emulates no "
                              "other architecture): build for this platform, or leave RUN "
                              "out of the stages built for another (COPY works)",
                              line=ins.node.start_line, step=self.step)
        uid, gid = self._ids(state, state.config.run.get("User") or "0")
        env = dict(entry.partition("=")[::2] for entry in state.config.run_env())
        req = ExecRequest(argv=args.argv, env=env,
                          cwd=state.config.run.get("WorkingDir") or "/", uid=uid, gid=gid)
        container = await self.b.pools.single(state.image, self.b.policy)
        try:
            result = await container.exec(req, on_output=Streamed(self._output))
            self._check(result, ins, args.argv)
            async with contextlib.aclosing(layer_tar(container)) as tar:
                return await self._store(state, key, text, tar), False
        finally:
            await self.b.pools.destroy(container)

    async def _output(self, name: str, data: bytes) -> None:
        await self.emit({"event": name, "step": self.step,
                         "data": data.decode("utf-8", "replace")})

    def _check(self, result: RunResult, ins: Instruction, argv: Sequence[str]) -> None:
        if result.status == Status.OK:
            return
        shown = " ".join(argv)[-200:]
        why = {
            Status.NONZERO_EXIT: f"exited with status {result.exit_code}",
            Status.SIGNALED: f"was killed by signal {result.signal}",
            Status.TIME_LIMIT: "ran out of CPU time (the build policy's cpu_ms)",
            Status.WALL_LIMIT: "ran past its time (the build policy's wall_ms)",
            Status.MEMORY_LIMIT: "ran out of memory (the build policy's memory_bytes)",
            Status.OUTPUT_LIMIT: "wrote more output than allowed (output_bytes)",
            Status.SYSCALL_BLOCKED: "made a system call the build policy blocks",
        }.get(result.status, f"failed: {result.error or result.status}")
        raise BuildFailed(f"{ins.where}: RUN {why}: {shown}", line=ins.node.start_line,
                          step=self.step)

    async def _copy(self, ins: Instruction, state: _State,
                    done: Mapping[int, _State]) -> tuple[str | None, bool]:
        args = state.config.copy_args(ins)
        selected, digest = await self._sources(args, ins, done)
        workdir = state.config.run.get("WorkingDir") or "/"
        dest = posixpath.join("/", workdir, args.dest)
        if args.dest.endswith("/") and not dest.endswith("/"):
            dest += "/"
        chown = self._ids(state, args.chown) if args.chown else None
        text = state.config.normal_form(ins)
        key = _key(state.key, text, digest)
        hit = await self._cached(key, state, text)
        if hit is not None:
            return hit, True
        archives = [ins.keyword == "ADD" and s.kind == "file" and is_archive(s.files[0])
                    for s in selected]
        target = CopyTarget(dest, chown=None if chown is None else (chown[0] or 0,
                                                                    chown[1] or 0),
                            chmod=args.chmod, where=ins.where, keyword=ins.keyword)
        tree = self.b.images.tree(state.layers)
        return await self._layer_step(state, key, text,
                                      lambda: copy_tar(selected, target, tree,
                                                       archives=archives))

    async def _sources(self, args: buildplan.CopyArgs, ins: Instruction,
                       done: Mapping[int, _State]) -> tuple[list[Selected], str]:
        inline = [Selected(name, "file", (_inline(name, content),))
                  for name, content in args.inline]
        if args.from_ is None:
            def pick() -> tuple[list[Selected], str]:
                # Blocking: a large context's directory takes a while to list and hash.
                found = [s for src in args.sources for s in self.context.select(
                    src, where=ins.where, instruction=ins.keyword)]
                return found, self.context.digest(found)
            selected, digest = await asyncio.to_thread(pick)
            return inline + selected, _key(digest, [(n, c) for n, c in args.inline])
        stage = args.from_stage
        if stage is not None:
            layers = done[stage].layers
        else:
            image = await self.b.resolve(args.from_, self.tenant, self.platform)
            layers, _ = self.b.images.build_base(image, self.tenant)
        tree = self.b.images.tree(layers)
        selected = [s for src in args.sources for s in tree.select(src, where=ins.where)]
        # Layers are content-addressed: they key what is copied out of them.
        return selected, _key([lr.diff_id for lr in layers], list(args.sources))

    def _ids(self, state: _State, user: str) -> tuple[int | None, int | None]:
        paths = [self.b.images.layers.path(lr.diff_id) for lr in state.layers]

        def read(path: str) -> bytes | None:
            return read_from_layers(paths, path, 1 << 20)
        try:
            return resolve_user(user, read)
        except ImageError as e:
            raise ImageError(f"user {user!r}: {e}") from None

    # layers and the cache

    def _history(self, text: str, *, empty: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"created": _now(), "created_by": text, "comment": _COMMENT}
        if empty:
            entry["empty_layer"] = True
        return entry

    async def _cached(self, key: str, state: _State, text: str) -> str | None:
        """The step's layer from the tenant's cache (the state moved on to it), or None."""
        if self.req.no_cache:
            return None
        image = await self.b.images.cached_step(self.tenant, key, self.holder())
        if image is None:
            return None
        layers = self.b.images.layers_of(image)
        if layers[:len(state.layers)] != state.layers or len(layers) != len(state.layers) + 1:
            return None  # not this step's: never expected, but never trusted either
        history = [h for h in image.config.raw.get("history") or ()]
        state.history.append(dict(history[-1]) if history else self._history(text,
                                                                             empty=False))
        state.layers, state.image, state.key = layers, image, key
        return layers[-1].diff_id

    async def _layer_step(self, state: _State, key: str, text: str,
                          make: Callable[[], Iterator[bytes]]) -> tuple[str | None, bool]:
        return await self._store(state, key, text, _threaded(make)), False

    async def _store(self, state: _State, key: str, text: str,
                     tar: AsyncIterator[bytes]) -> str:
        history = [*state.history, self._history(text, empty=False)]
        image = await self.b.images.build_step(
            self.tenant, self.holder(), state.layers, tar,
            self._config_maker(state, history), str(state.platform), key=key)
        state.layers = self.b.images.layers_of(image)
        state.image, state.key, state.history, state.made = image, key, history, True
        return state.layers[-1].diff_id

    def _config_maker(self, state: _State, history: list[dict[str, Any]]
                      ) -> Callable[[list[str]], bytes]:
        run = state.config.image_run()
        base, platform, author = state.base, state.platform, state.config.author

        def make(diff_ids: list[str]) -> bytes:
            own = history[len(base.raw.get("history") or ()):] if base is not None else history
            return build_config(diff_ids=diff_ids, base=base, run=run, created=_now(),
                                history=own, author=author or "", platform=platform)
        return make

    async def final(self, state: _State, names: Sequence[Any]) -> Image:
        """The target stage as the build's image: cached like a step, so an unchanged
        rebuild gives the same image, named `names`."""
        key = _key(state.key, "image")
        if not self.req.no_cache:
            image = await self.b.images.cached_step(self.tenant, key, self.holder())
            if image is not None and self.b.images.layers_of(image) == state.layers:
                return self.b.images.name(image, names, self.tenant)
        return await self.b.images.build_step(
            self.tenant, self.holder(), state.layers, None,
            self._config_maker(state, state.history), str(state.platform), key=key,
            names=names)


def _inline(name: str, content: str) -> SourceFile:
    """A heredoc's file (`COPY <<EOF /path`)."""
    data = content.encode()
    return SourceFile("", "file", 0o644, len(data), int(time.time()),
                      open=lambda: io.BytesIO(data))


async def _threaded(make: Callable[[], Iterator[bytes]]) -> AsyncIterator[bytes]:
    """A blocking generator's chunks, gathered and read in a worker thread."""
    chunks = make()
    done = object()

    def gather() -> bytes | object:
        out, size = [], 0
        for chunk in chunks:
            out.append(chunk)
            size += len(chunk)
            if size >= _GATHER:
                break
        return b"".join(out) if out else done

    while True:
        got = await asyncio.to_thread(gather)
        if got is done:
            return
        assert isinstance(got, bytes)
        yield got
