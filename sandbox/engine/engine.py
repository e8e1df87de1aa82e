"""The one facade the service talks to: images, warm pools, sessions and runs.

`Engine.run` is a one-shot run: resolve the image (pulling it the first time), the policy
and the limits, once, and pass them down; borrow a warm container for (image digest,
policy) or start one, copy the request's files in, exec, and give the container back
(reset and reused when its root is read-only, destroyed and replaced when it is writable).
Sessions (sessions.py) are containers a caller keeps: exec many times, copy files in and
out, commit into an image, delete; idle ones expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from sandbox import statedir
from sandbox.engine import pipeline, runfiles
from sandbox.engine.builder import Builder, BuildRequest, Emit
from sandbox.engine.copyout import copy_out, wanted
from sandbox.engine.cpuslots import AFFINITY, CPUSET, CpuSlots, Slot, TimingConfig
from sandbox.engine.filecache import FileCache, FileCacheConfig
from sandbox.engine.pool import PoolConfig, Pools
from sandbox.engine.records import ContainerRecords
from sandbox.engine.repeats import summarize
from sandbox.engine.sessions import Session, Sessions
from sandbox.engine.specs import NOTHING, PipelineOutcome, PipelineSpec, RunOutcome, RunSpec
from sandbox.errors import BuildFailed, NotFound, PolicyError, WrongPlatform
from sandbox.images import (
    Image,
    ImageService,
    Ownership,
    Platform,
    ProgressCallback,
    PublicNames,
    RegistriesConfig,
    apply_run,
    digests,
    platform_serves,
)
from sandbox.images.buildcontext import BuildContext, ContextLimits
from sandbox.runtime.container import Container
from sandbox.runtime.hostinfo import report as host_report
from sandbox.runtime.network import MODES, NO_NETWORK, NONE, PROXY, NetworkRequest, proxy_env
from sandbox.runtime.network.rules import DEFAULT_BLOCKED, Blocked
from sandbox.runtime.output import OutputCallback
from sandbox.runtime.policy import Policy, RunLimits
from sandbox.runtime.profiles import Limits, Profile, host_cpus, parse_cpuset
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import Status
from sandbox.runtime.run import FALLBACK_CPUSET
from sandbox.runtime.runcontrol import RunControl
from sandbox.runtime.spawnerclient import Runtime
from sandbox.tenants import Tenant

# What a caller may give as a run's network: a mode's name, or the service's request with
# the tenant's allowlist (a bare "proxy" reaches no host).
NetworkAsked = str | NetworkRequest | None
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyLimits:
    """Limit defaults and maxima set for one profile (by the service's config); each one set
    replaces the profile's own, the others stay as its file says."""

    defaults: Limits = field(default_factory=Limits)
    maxima: Limits = field(default_factory=Limits)

    def applied_to(self, profile: Profile) -> Profile:
        """`profile` with these limits over its own; PolicyError (naming the key) when a
        default ends up above its maximum, which every run without limits would fail."""
        merged = replace(profile, defaults=self.defaults.over(profile.defaults),
                         maxima=self.maxima.over(profile.maxima))
        merged.defaults.check_within(merged.maxima, where=f"policies.{profile.name}.defaults")
        return merged


@dataclass(frozen=True)
class BuildConfig:
    policy: str = "build"                # the profile of RUN steps; never a run's or a session's
    timeout_s: float = 3600.0            # a whole build, its context upload included
    context: ContextLimits = field(default_factory=ContextLimits)


@dataclass(frozen=True)
class EngineConfig:
    state_dir: Path
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    pools: PoolConfig = field(default_factory=PoolConfig)
    session_idle_s: float = 600.0        # sessions unused this long are deleted
    default_policy: str = "default"
    policy_limits: Mapping[str, PolicyLimits] = field(default_factory=dict)  # by profile name
    public_images: PublicNames = field(default_factory=PublicNames)  # shared by every tenant
    build: BuildConfig = field(default_factory=BuildConfig)
    files: FileCacheConfig = field(default_factory=FileCacheConfig)  # the file cache
    timing: TimingConfig = field(default_factory=TimingConfig)       # CPU slots (cpuslots.py)
    node: str | None = None              # the cluster node: its session ids begin "<node>."
    # What `proxy` and `full` never reach (with the host's own addresses)
    network_blocked: tuple[str, ...] = DEFAULT_BLOCKED   # CIDRs


def known_policies() -> list[str]:
    """The profiles shipped in policies/profiles/."""
    return sorted(p.name.removesuffix(".json")
                  for p in (resources.files("policies") / "profiles").iterdir()
                  if p.name.endswith(".json"))


def _set_limits(limits: Limits) -> dict[str, Any]:
    return {k: v for k, v in asdict(limits).items() if v is not None}




class Engine:
    def __init__(self, config: EngineConfig, runtime: Runtime, images: ImageService,
                 host: dict[str, Any]) -> None:
        self.config = config
        self.host = host                 # what this host can enforce, probed at start
        self.runtime = runtime
        self.images = images
        # What runs here: the host's os and architecture, any variant (see _runnable).
        self._native = Platform(images.platform.os, images.platform.architecture)
        self.records = ContainerRecords(config.state_dir)
        runtime.claims = self.records  # the cgroups it makes ahead are recorded too
        self.pools = Pools(runtime, config.pools, images, self.records)
        self.files = FileCache(config.state_dir / "files", config.files)
        # Every container made from now on can bind cached files (runfiles.py).
        runtime.files = str(self.files.blob_dir)
        runtime.proxy.blocked = Blocked.parse(config.network_blocked)
        self.sessions = Sessions(self.pools, images, self.files, self._request,
                                 node=config.node)
        driver = runtime.cgroups.driver
        self.cpuset_by = CPUSET if driver and "cpuset" in driver.controllers else AFFINITY
        timing = config.timing
        self.slots = None if timing.cpus is None else CpuSlots(
            parse_cpuset(timing.cpus, "timing.cpus"), host_cpus(), self.cpuset_by,
            timing.policies)
        self._reaper: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: EngineConfig) -> Engine:
        statedir.prepare(config.state_dir)
        runtime = await Runtime.start()
        try:
            host = await asyncio.to_thread(host_report, runtime.cgroups, runtime.mapping)
            images = ImageService(config.state_dir, registries=config.registries,
                                  ownership=Ownership.for_mapping(runtime.mapping),
                                  overlay=bool(host["overlay_in_userns"]),
                                  public=config.public_images)
            for name, limits in config.policy_limits.items():
                runtime.policies.register(limits.applied_to(runtime.policies.profile(name)))
        except BaseException:
            await runtime.close()  # its spawner must not outlive a start that failed
            raise
        # What builds of an instance that died left (their contexts): no build survives it.
        await asyncio.to_thread(shutil.rmtree, config.state_dir / "builds", True)
        engine = cls(config, runtime, images, host)
        swept = await asyncio.to_thread(engine.records.sweep, runtime.cgroups.driver)
        if swept:
            log.warning("removed what %d containers of a previous instance left: %s",
                        len(swept), ", ".join(swept))
        engine._reaper = asyncio.create_task(engine.sessions.expire(config.session_idle_s))
        engine._expiry = asyncio.create_task(engine._expire_files())
        return engine

    async def _expire_files(self) -> None:
        """Forget, every so often and for ever, cached files unused for their TTL."""
        while True:
            await asyncio.sleep(min(600.0, max(1.0, self.config.files.ttl_s / 4)))
            try:
                await asyncio.to_thread(self.files.expire)
            except OSError as e:  # the next round tries again; a full disk is not a crash
                log.warning("expiring cached files failed: %s", e)

    async def close(self) -> None:
        for task in (self._reaper, self._expiry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.sessions.close()
        await self.pools.close()
        await self.runtime.close()
        await self.images.close()
        self.files.close()

    # images

    async def image(self, reference: str, *, tenant: Tenant, platform: Platform | None = None,
                    on_progress: ProgressCallback | None = None) -> Image:
        """An image to run as `tenant` names it, pulled the first time it asks for it (a
        bare digest names no registry: it must be one of the tenant's images), or pulled
        again for `platform` when the local one is for another. WrongPlatform unless it
        runs on this host."""
        return self._runnable(await self._find(reference, tenant, platform, on_progress))

    async def _find(self, reference: str, tenant: Tenant, platform: Platform | None,
                    on_progress: ProgressCallback | None = None) -> Image:
        by_digest = digests.is_digest(reference.strip())
        found: Image | None = None
        try:
            found = await self.images.resolve(reference, tenant=tenant)
        except NotFound:
            if by_digest:
                raise
        if (found is not None and platform is not None and not by_digest
                and not platform_serves(found.platform, platform)):
            found = None
        if found is None:
            found = await self.images.pull(reference, tenant=tenant, platform=platform,
                                           on_progress=on_progress)
        return found

    def _runnable(self, image: Image) -> Image:
        host = self._native
        if not platform_serves(image.platform, host):
            raise WrongPlatform(
                f"image {(image.names or (image.digest,))[0]} is built for {image.platform}, and "
                f"this machine is {host}; sandboxd emulates no other architecture: use the "
                f"image's {host.os}/{host.architecture} variant (\"platform\": "
                f"\"{host.os}/{host.architecture}\" when its name is a multi-platform index)")
        return image

    async def remove_image(self, reference: str, *, tenant: Tenant,
                           force: bool = False) -> list[str]:
        """Remove `tenant`'s name(s) of an image (ImageService.remove). Its idle warm
        containers go first: they are a cache, not a use; a run or a session is."""
        image = await self.images.resolve(reference, tenant=tenant)
        await self.pools.drop_idle(image, tenant)
        return self.images.remove(reference, tenant=tenant, force=force)

    def policy(self, name: str | None = None) -> Policy:
        """The policy `name` (default: the configured one), resolved once by the runtime's
        registry; PolicyError naming the known ones when there is none. Callers that
        resolve it ahead (to validate a request) pass it to `run` and `create_session`."""
        if name is not None and name == self.config.build.policy:
            raise PolicyError(f"policy: {name!r} is the policy of build steps, not of runs or "
                              "sessions; choose another (GET /v1/policies lists them)")
        return self.runtime.policies.get(name or self.config.default_policy)

    def _policy(self, policy: Policy | str | None, network: NetworkAsked) -> Policy:
        resolved = policy if isinstance(policy, Policy) else self.policy(policy)
        mode = network.mode if isinstance(network, NetworkRequest) else network
        if mode not in (None, *MODES):
            raise PolicyError(f"network: {mode!r} is not supported; use one of "
                              f"{', '.join(MODES)}")
        if mode is not None and resolved.profile.network != NONE:
            # The operator's policy decides; a request must not believe it got otherwise.
            raise PolicyError(f"network: policy {resolved.name!r} runs with network "
                              f"{resolved.profile.network!r}, not {mode!r}; choose a "
                              "policy whose network is what you need, or leave network out")
        return resolved

    @staticmethod
    def _network(network: NetworkAsked) -> NetworkRequest:
        return (network if isinstance(network, NetworkRequest)
                else NO_NETWORK if network in (None, NONE) else NetworkRequest(network))

    async def _image(self, image: Image | str, tenant: Tenant) -> Image:
        """`image` as `tenant` names it, unless the caller resolved it already (with
        `image()`, which checked that it runs here)."""
        return image if isinstance(image, Image) else await self.image(image, tenant=tenant)

    def _request(self, image: Image, spec: RunSpec, policy: Policy,
                 net: NetworkRequest | None = None) -> ExecRequest:
        """The run's request, its limits resolved (checked against the policy's maxima
        before any container is taken for it): no layer below resolves them again. A
        proxy run's environment names the proxy (the image's and the run's env over it)."""
        asked = spec.limits
        if isinstance(spec.stdin, int):
            asked = _interactive(asked, policy.profile.maxima)
        limits = self._placed(policy.limits(asked))
        argv, env, cwd = apply_run(image.defaults, cmd=spec.cmd, env=spec.env, cwd=spec.cwd)
        if net is not None and net.mode == PROXY:
            env = proxy_env() | env
        if spec.tty is not None:
            # As Docker gives a run with a terminal (the image's and the run's env win):
            # programs that draw on it (vi, less, top) need to know what it is.
            env = {"TERM": "xterm"} | env
        uid, gid = self.images.user_ids(image, spec.user)
        return ExecRequest(argv=argv, env=env, cwd=cwd, stdin=spec.stdin, limits=limits,
                           uid=uid, gid=gid, tty=spec.tty)

    def _placed(self, limits: RunLimits) -> RunLimits:
        """With CPUs reserved, every run (a session's exec too) stays off them unless a slot
        gives it one (`_cpus`): a run asking no cpuset gets the others, one asking reserved
        CPUs is refused (PolicyError naming limits.cpuset)."""
        slots = self.slots
        if slots is None:
            return limits
        if limits.cpuset is None:
            return replace(limits, cpuset=slots.shared_cpus)
        if not parse_cpuset(limits.cpuset, "limits.cpuset") <= parse_cpuset(
                slots.shared_cpus, "timing"):
            raise PolicyError(f"limits.cpuset: {limits.cpuset} names CPUs reserved for the "
                              f"runs of the {', '.join(sorted(slots.policies))} policies, "
                              f"which get one of them each; ask for a subset of "
                              f"{slots.shared_cpus}, or for no cpuset")
        return limits

    # one-shot runs

    async def run(self, image: Image | str, spec: RunSpec, *, tenant: Tenant,
                  policy: Policy | str | None = None, network: NetworkAsked = None,
                  on_output: OutputCallback | None = None,
                  control: RunControl | None = None) -> RunOutcome:
        """One run in a warm container. `image` is a reference, or an Image the caller
        already resolved for `tenant` (`image()`); `policy` a name, or a `policy()`;
        `network` a mode, or the service's NetworkRequest (its allowlist for `proxy`)."""
        resolved = self._policy(policy, network)
        net = self._network(network)
        self.check_timing(spec, streamed=on_output is not None or control is not None)
        found = await self._image(image, tenant)
        req = self._request(found, spec, resolved, net)
        if spec.repeat > 1:
            results = [await self._run_once(found, spec, req, resolved, tenant, net, None,
                                            None) for _ in range(spec.repeat)]
            repeats = summarize([o.result for o in results])
            return replace(results[repeats.main], repeats=repeats)
        outcome = await self._run_once(found, spec, req, resolved, tenant, net, on_output,
                                       control)
        first = outcome.result
        if spec.rerun_near_limit and first.status == Status.TIME_LIMIT and first.near_limit:
            again = await self._run_once(found, spec, req, resolved, tenant, net, None, None)
            outcome = replace(again, rerun=first)
        return outcome

    def check_timing(self, spec: RunSpec, *, streamed: bool = False) -> None:
        """PolicyError, naming the field, for a `repeat` or `rerun_near_limit` no run can
        honour; before anything runs."""
        cap = self.config.timing.max_repeat
        if spec.repeat > cap:
            raise PolicyError(f"repeat: {spec.repeat} is above this service's maximum of "
                              f"{cap} (timing.max_repeat); ask for at most {cap}")
        if spec.repeat > 1 and spec.rerun_near_limit:
            raise PolicyError("rerun_near_limit: not with repeat above 1, whose spread says "
                              "it already; give one or the other")
        if streamed and (spec.repeat > 1 or spec.rerun_near_limit):
            field = "repeat" if spec.repeat > 1 else "rerun_near_limit"
            raise PolicyError(f"{field}: a run made more than once gives one result, not a "
                              "stream: ask for the JSON result (no NDJSON, SSE or WebSocket)")

    @contextlib.asynccontextmanager
    async def _cpus(self, policy: Policy, limits: Limits,
                    tenant: Tenant) -> AsyncIterator[tuple[str | None, Slot | None]]:
        """The CPUs of one run: a reserved one of its own for the timing policies (waiting
        for it first), whatever it asked; for the rest, those `_placed` gave it."""
        slots = self.slots
        if slots is None:
            yield limits.cpuset, None
        elif slots.takes_slot(policy.name):
            async with slots.slot(tenant.id) as slot:
                yield str(slot.cpu), slot
        else:
            with slots.shared():
                yield limits.cpuset, None

    async def _run_once(self, found: Image, spec: RunSpec, req: ExecRequest, policy: Policy,
                        tenant: Tenant, net: NetworkRequest, on_output: OutputCallback | None,
                        control: RunControl | None) -> RunOutcome:
        """One run of `run`, in a warm container, on the CPUs `_cpus` gives it."""
        assert req.limits is not None  # resolved by _request
        async with self._cpus(policy, req.limits, tenant) as (cpus, slot):
            if cpus != req.limits.cpuset:
                req = replace(req, limits=replace(req.limits, cpuset=cpus))
            outcome = await self._exec(found, spec, req, policy, tenant, net, on_output,
                                       control)
            if slot is not None and self.slots is not None:
                outcome.result.dedicated_cpu = self.slots.dedicated(slot)
        return outcome

    async def _exec(self, found: Image, spec: RunSpec, req: ExecRequest, resolved: Policy,
                    tenant: Tenant, net: NetworkRequest, on_output: OutputCallback | None,
                    control: RunControl | None) -> RunOutcome:
        loan = self.pools.lend(found, resolved, tenant, net)
        copied = NOTHING
        async with loan as container:
            bound = await runfiles.place(container, spec.files, self.files, uid=req.uid,
                                         gid=req.gid, exec_follows=True)
            # Files to copy out are read before the reset that would take them away.
            keep = wanted(spec)
            result = await container.exec(req, on_output=on_output, control=control,
                                          reset_after=not keep)
            await bound()  # a bind that failed refused the run: its error, not the run's
            if keep:
                copied = await copy_out(container, spec, tenant, self.files)
                await container.reset()
        return RunOutcome(result, loan.warm, found.digest, copied, network=loan.traffic)

    async def _put_files(self, container: Container, spec: RunSpec, req: ExecRequest) -> None:
        """A run's files into its container, owned by its user (runs and pipelines): cached
        ones bound read-only, the rest copied (runfiles.py)."""
        bound = await runfiles.place(container, spec.files, self.files, uid=req.uid,
                                     gid=req.gid)
        await bound()

    async def pipeline(self, image: Image | str, spec: PipelineSpec, *, tenant: Tenant,
                       policy: Policy | str | None = None,
                       network: NetworkAsked = None) -> PipelineOutcome:
        """Processes of one image wired by pipes, each a run of its own in a warm container
        of `tenant`'s, shared or each its own (see pipeline.py); `image` and `policy` as
        for `run`. PolicyError, naming the field, before anything runs for a pipeline that
        cannot be wired."""
        pipeline.check(spec)
        resolved = self._policy(policy, network)
        net = self._network(network)
        found = await self._image(image, tenant)
        reqs = pipeline.requests_of(spec, lambda p: self._request(found, p, resolved, net))
        pipeline.check_requests(reqs, self.runtime.mapping,
                                resolved.profile.maxima.output_bytes)
        first = reqs[0].limits
        assert first is not None  # resolved by _request
        # One CPU slot for the whole pipeline under a timing policy: its processes mostly
        # take turns, and each one's CPU time is its own whatever CPU it shares.
        async with self._cpus(resolved, first, tenant) as (cpus, slot):
            reqs = [r if r.limits is None or r.limits.cpuset == cpus
                    else replace(r, limits=replace(r.limits, cpuset=cpus)) for r in reqs]
            outcome = await pipeline.run(self.pools, self.files, self._put_files, found,
                                         resolved, tenant, spec, reqs, net)
            if slot is not None and self.slots is not None:
                for p in outcome.processes:
                    p.result.dedicated_cpu = self.slots.dedicated(slot)
        return outcome

    # builds

    async def build(self, context: AsyncIterator[bytes], req: BuildRequest, *, tenant: Tenant,
                    emit: Emit, allow: Callable[[str], None] | None = None) -> Image:
        """Build an image of `tenant` from a build context (a tar stream, plain or gzip,
        with the Dockerfile) as `req` asks (see builder.py): its events go to `emit`. The
        context is kept in a directory of its own under the state directory until the
        build ends; the whole build is bounded by build.timeout_s. `allow(reference)` is
        asked before a FROM or COPY --from image is used (Forbidden to refuse it)."""
        self.images.check_tags(req.tags, tenant)
        policy = self.runtime.policies.get(self.config.build.policy)
        async def resolve(reference: str, tenant: Tenant, platform: Platform | None) -> Image:
            # Pulled for the build's platform, which need not be this host's: its RUN steps
            # would be refused, its COPY steps work.
            if allow is not None:
                allow(reference)
            return await self._find(reference, tenant, platform)

        builder = Builder(self.pools, self.images, policy, resolve, self._native)
        root = self.config.state_dir / "builds"
        root.mkdir(mode=0o700, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=root))
        try:
            async with asyncio.timeout(self.config.build.timeout_s):
                ctx = await BuildContext.receive(context, work, self.config.build.context)
                try:
                    return await builder.build(ctx, req, tenant, emit)
                finally:
                    ctx.close()
        except TimeoutError:
            raise BuildFailed(f"the build ran past {self.config.build.timeout_s:g} s "
                              "(build.timeout_s): make its steps shorter, or ask the "
                              "operator for a longer limit") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    def prune_build_cache(self, tenant: Tenant) -> dict[str, int]:
        removed, report = self.images.prune_build_cache(tenant)
        return {"removed": removed, "freed_bytes": report.freed_bytes}

    # sessions

    async def create_session(self, image: Image | str, *, tenant: Tenant,
                             policy: Policy | str | None = None, network: NetworkAsked = None,
                             limits: Limits | None = None) -> Session:
        """A container `tenant` keeps (see sessions.py); only calls naming the same tenant
        find it. `image` and `policy` as for `run`; `limits`, the default of the session's
        execs, are resolved here."""
        resolved = self._policy(policy, network)
        if limits is not None:
            limits = resolved.limits(limits)
        return await self.sessions.open(await self._image(image, tenant), resolved, tenant,
                                        limits, self._network(network))

    def pool_stats(self) -> list[dict[str, Any]]:
        """Every tenant's pools: for the operator's metrics, never for a tenant."""
        return self.pools.stats()

    def health(self) -> tuple[bool, str]:
        """Whether runs can start now, and why not when they cannot (for /readyz)."""
        down = self.runtime.down()
        return (False, down) if down is not None else (True, "")

    @property
    def live_containers(self) -> int:
        """Containers alive: pools, runs and sessions, of every tenant."""
        return self.pools.live

    def policies(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every profile's effective limit defaults and maxima (the config's applied)."""
        out = {}
        for name in sorted({*known_policies(), *self.config.policy_limits}):
            profile = self.runtime.policies.profile(name)
            out[name] = {"defaults": _set_limits(profile.defaults),
                         "maxima": _set_limits(profile.maxima)}
        return out

    def info(self, tenant: Tenant) -> dict[str, Any]:
        """What `tenant` may know: the host, its own pools and sessions, the policies."""
        return {"host": self.host, "pools": self.pools.stats(tenant),
                "sessions": len(self.sessions.list(tenant.id)), "policies": self.policies(),
                "timing": self.timing_info(tenant)}

    def timing_info(self, tenant: Tenant) -> dict[str, Any]:
        """The CPU slots (none unless [timing] cpus reserves some), how a run's CPUs are
        kept here, and `tenant`'s own runs in slots or waiting for one."""
        info = ({"cpus": None, "enforced_by": self.cpuset_by} if self.slots is None
                else self.slots.info(tenant.id))
        if self.cpuset_by == AFFINITY:
            info["warning"] = FALLBACK_CPUSET
        return info


# What a run fed as it goes (the WebSocket: a person at a terminal, or a program talking to
# it) spends waiting on its user: without its own, it gets the policy's most, not the
# default meant for a batch run (`sbx run -it IMAGE sh` is not killed after 30 s).
INTERACTIVE_AT_MAXIMUM = ("wall_ms", "cpu_ms", "output_bytes")


def _interactive(asked: Limits | None, maxima: Limits) -> Limits:
    asked = asked or Limits()
    return replace(asked, **{key: getattr(maxima, key) for key in INTERACTIVE_AT_MAXIMUM
                             if getattr(asked, key) is None})
