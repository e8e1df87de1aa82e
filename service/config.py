"""The service's configuration: a TOML file, then environment overrides.

    [server]   host, port, state_dir, session_idle_s, default_policy, shutdown_deadline_s,
               allowed_hosts (names besides loopback ones clients reach the service by)
    [[tokens]] token, name (the tenant: unique), max_concurrent_runs, registries (allowed
               registry hosts), max_sessions, max_image_bytes, max_file_bytes, max_files
               (the tenant's quotas)
    [registries."host"] ... (sandbox.images.registry.config.RegistriesConfig.from_dict)
    [pools]    min_idle, max_idle, max_live (sandbox.engine.pool.PoolConfig.from_dict)
    [limits]   json_body_bytes, import_body_bytes, file_body_bytes, files_count,
               files_bytes, max_running, max_queued, sessions_per_tenant,
               image_bytes_per_tenant, file_bytes_per_tenant, files_per_tenant (a
               tenant's quotas unless its token sets its own), batch_cases
    [files]    ttl_s, max_file_bytes: the file cache (sandbox.engine.filecache.FileCacheConfig)
    [jobs]     callback_hosts (the hosts callbacks may reach), callback_attempts,
               callback_timeout_s, callback_backoff_s, callback_backoff_max_s, workers,
               max_queued_per_tenant, max_kept_per_tenant, ttl_s (JobsConfig)
    [timing]   cpus (CPUs reserved for runs of `policies`, one run per CPU), policies
               (default ["judge"]), max_repeat (a run's `repeat` at most) (TimingConfig)
    [images]   public: image names shared with every tenant (sandbox.tenants.PublicNames)
    [gojudge]  enabled, image, policy, workdir: go-judge's API (/run, /file), off by default
    [build]    policy (the profile of RUN steps), timeout_s, max_context_bytes,
               max_context_entries (sandbox.engine.BuildConfig)
    [policies.<profile>.defaults] / [policies.<profile>.maxima]  a run's limits (the keys of
               sandbox.runtime.profiles.Limits), each replacing the profile file's own
    [cluster]  node (this node's name: ids of its sessions and jobs begin with it), peers
               (a table: node name -> base URL), peer_url (a template with {node}),
               connect_timeout_s (ClusterConfig; service/cluster/)

Environment: SANDBOXD_TOKENS (comma-separated), SANDBOXD_STATE_DIR, SANDBOXD_HOST,
SANDBOXD_PORT, SANDBOXD_NODE (cluster.node: e.g. a pod's name) override the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sandbox import (
    LOCAL_TENANT,
    BuildConfig,
    ContextLimits,
    EngineConfig,
    FileCacheConfig,
    Limits,
    PolicyError,
    PolicyLimits,
    PoolConfig,
    PublicNames,
    RegistriesConfig,
    SandboxError,
    Tenant,
    TimingConfig,
    load_profile,
    split_host,
)

MiB = 1 << 20


class ConfigError(SandboxError):
    """The service's configuration is invalid; the message names the setting."""


@dataclass(frozen=True)
class TokenConfig:
    token: str
    name: str                                   # the tenant's id: unique, stable
    max_concurrent_runs: int | None = None      # runs at once (running or queued)
    registries: tuple[str, ...] | None = None   # registry hosts it may use; None: any
    max_sessions: int | None = None             # None: limits.sessions_per_tenant
    max_image_bytes: int | None = None          # None: limits.image_bytes_per_tenant
    max_file_bytes: int | None = None           # None: limits.file_bytes_per_tenant
    max_files: int | None = None                # None: limits.files_per_tenant


@dataclass(frozen=True)
class ServiceLimits:
    json_body_bytes: int = 16 * MiB
    import_body_bytes: int = 256 * MiB
    file_body_bytes: int = 64 * MiB             # PUT /v1/containers/{id}/files
    files_count: int = 256                      # files in one run request
    files_bytes: int = 16 * MiB                 # their decoded contents together
    max_running: int = 64                       # runs executing at once, service-wide
    max_queued: int = 256                       # runs waiting for a slot; then 429
    sessions_per_tenant: int = 32               # sessions a tenant keeps at once; then 429
    image_bytes_per_tenant: int = 32 << 30      # what its images use (blobs + layers); 413
    file_bytes_per_tenant: int = 1 << 30        # what its cached files hold; then 413
    files_per_tenant: int = 10_000              # how many cached files it keeps; then 429
    batch_cases: int = 10_000                   # cases in one batch (POST /v1/batches)


@dataclass(frozen=True)
class JobsConfig:
    """Async jobs (service/jobs): how many run at once, what a tenant may keep, and where
    and how their callbacks go."""

    # host, host:port, IP address or [IPv6]:port; a callback_url must name one of them. A
    # name must resolve to public addresses: a receiver on a local or private address is
    # listed by its address.
    callback_hosts: tuple[str, ...] = ()
    callback_attempts: int = 6                  # deliveries tried, the first included
    callback_timeout_s: float = 10.0            # one attempt, connect to answer
    callback_backoff_s: float = 1.0             # the wait before a retry: random, up to
    callback_backoff_max_s: float = 60.0        # backoff_s * 2^(attempt-1), at most this
    workers: int = 4                            # jobs running at once, service-wide
    max_queued_per_tenant: int = 1000           # queued or running; then 429
    max_kept_per_tenant: int = 10_000           # any status, until deleted or expired; 429
    ttl_s: float = 86400.0                      # a finished job is kept this long


@dataclass(frozen=True)
class GojudgeConfig:
    """go-judge's API (service/api/gojudge.py). go-judge has no images: every /run of it
    runs in `image` under `policy`, its relative paths below `workdir` (a directory every
    run may write: /tmp is a tmpfs of every profile)."""

    enabled: bool = False
    image: str | None = None                    # required when enabled
    policy: str | None = None                   # None: server.default_policy
    workdir: str = "/tmp"


# A node's name: a DNS label (a pod's name fits), so that it can name the node's host in
# cluster.peer_url, and has no '.', which ends it in the ids it begins.
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class ClusterConfig:
    """Many nodes (service/cluster/): a session or job lives on the node that made it, its id
    begins with that node's name and a '.', and a request for it that reaches another node
    is forwarded to the owner, found in `peers` or else through `peer_url`."""

    node: str | None = None                     # None: a single node, ids without a node
    peers: Mapping[str, str] = field(default_factory=dict)  # node name -> its base URL
    peer_url: str | None = None                 # e.g. "http://{node}.sandboxd-nodes:8643"
    connect_timeout_s: float = 2.0              # a peer not connected by then is gone (410)

    def url_of(self, node: str) -> str | None:
        """The base URL of node `node`, None when this cluster has no way to reach it."""
        if node in self.peers:
            return self.peers[node]
        if self.peer_url is not None and NODE_NAME.fullmatch(node):
            return self.peer_url.replace("{node}", node)
        return None

    def own_hosts(self) -> tuple[str, ...]:
        """The host names peers reach this node by: requests they forward name them."""
        url = None if self.node is None else self.url_of(self.node)
        host = None if url is None else _url_host(url)
        return () if host is None else (host,)


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8643
    tokens: tuple[TokenConfig, ...] = ()
    registries: Mapping[str, Any] = field(default_factory=dict)
    pools: Mapping[str, Any] = field(default_factory=dict)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    session_idle_s: float = 600.0
    default_policy: str = "default"
    shutdown_deadline_s: float = 10.0
    policy_limits: Mapping[str, PolicyLimits] = field(default_factory=dict)
    public_images: PublicNames = field(default_factory=PublicNames)
    build: BuildConfig = field(default_factory=BuildConfig)
    files: FileCacheConfig = field(default_factory=FileCacheConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    gojudge: GojudgeConfig = field(default_factory=GojudgeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Host names (besides localhost, IP addresses and `host`) that requests may name in their
    # Host header; any other is refused, which defeats DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()

    def engine_config(self) -> EngineConfig:
        return EngineConfig(state_dir=self.state_dir,
                            registries=RegistriesConfig.from_dict(self.registries),
                            pools=PoolConfig.from_dict(dict(self.pools)),
                            session_idle_s=self.session_idle_s,
                            default_policy=self.default_policy,
                            policy_limits=self.policy_limits,
                            public_images=self.public_images, build=self.build,
                            files=self.files, timing=self.timing, node=self.cluster.node)

    def tenant(self, token: TokenConfig | None) -> Tenant:
        """The tenant a token (None: the one of a service without tokens) acts as, with its
        quotas: its own where it sets them, else the [limits] defaults."""
        limits = self.limits
        if token is None:
            return Tenant(LOCAL_TENANT.id, limits.sessions_per_tenant,
                          limits.image_bytes_per_tenant, limits.file_bytes_per_tenant,
                          limits.files_per_tenant)

        def own(mine: int | None, default: int) -> int:
            return default if mine is None else mine

        return Tenant(token.name, own(token.max_sessions, limits.sessions_per_tenant),
                      own(token.max_image_bytes, limits.image_bytes_per_tenant),
                      own(token.max_file_bytes, limits.file_bytes_per_tenant),
                      own(token.max_files, limits.files_per_tenant))

    def check_bind(self) -> None:
        """Without tokens anyone who can reach the port runs code: loopback only."""
        if not self.tokens and not is_loopback(self.host):
            raise ConfigError(f"no API tokens are configured, so sandboxd binds only to "
                              f"loopback, not {self.host!r}: configure [[tokens]] or "
                              "SANDBOXD_TOKENS, or use --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: expected an integer of at least {minimum}")
    return value


def _seconds(value: Any, where: str) -> float:
    # `not > 0` refuses NaN too (TOML has nan), which no comparison would ever pass
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{where}: expected a positive number of seconds")
    return float(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _hosts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ConfigError('server.allowed_hosts: expected a list of host names, e.g. '
                          '["sandbox.internal"]')
    return tuple(h.lower().rstrip(".") for h in value)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table")
    return value


def _token(raw: Any, where: str) -> TokenConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table with token, name, max_concurrent_runs, "
                          "registries")
    known = ("token", "name", "max_concurrent_runs", "registries", "max_sessions",
             "max_image_bytes", "max_file_bytes", "max_files")
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown setting; known: "
                          f"{', '.join(known)}")
    token = _str(raw.get("token"), f"{where}.token")
    if len(token) < 16:
        raise ConfigError(f"{where}.token: at least 16 characters, e.g. from "
                          "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
    regs = raw.get("registries")
    if regs is not None and (not isinstance(regs, list)
                             or not all(isinstance(r, str) and r for r in regs)):
        raise ConfigError(f"{where}.registries: expected a list of registry hosts")
    def optional(key: str, minimum: int) -> int | None:
        value = raw.get(key)
        return None if value is None else _int(value, f"{where}.{key}", minimum)

    # Unnamed, a token's tenant is named after the token's hash: stable when the list is
    # reordered (its images and sessions stay its own), and no secret in logs or listings.
    default_name = "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    return TokenConfig(token=token, name=_str(raw.get("name", default_name), f"{where}.name"),
                       max_concurrent_runs=optional("max_concurrent_runs", 1),
                       registries=None if regs is None else tuple(regs),
                       max_sessions=optional("max_sessions", 0),
                       max_image_bytes=optional("max_image_bytes", 0),
                       max_file_bytes=optional("max_file_bytes", 0),
                       max_files=optional("max_files", 0))


def _public_images(raw: Mapping[str, Any]) -> PublicNames:
    if set(raw) - {"public"}:
        raise ConfigError(f"images.{sorted(set(raw) - {'public'})[0]}: unknown setting; "
                          "known: public")
    entries = raw.get("public", [])
    if not isinstance(entries, list):
        raise ConfigError('images.public: expected a list of image names or patterns, e.g. '
                          '["docker.io/library/python:*"]')
    try:
        return PublicNames.parse(entries)
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def _policy_limits(raw: Mapping[str, Any]) -> dict[str, PolicyLimits]:
    """[policies.<profile>] tables, checked against the profiles they change: an unknown
    profile or limit, or a default left above its maximum, fails here rather than at runs."""
    out = {}
    for name, table in raw.items():
        where = f"policies.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table with defaults and maxima")
        unknown = set(table) - {"defaults", "maxima"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown setting; known: "
                              "defaults, maxima")
        try:
            profile = load_profile(name)
        except PolicyError as e:
            raise ConfigError(f"{where}: {e}") from None
        parts = []
        for part in ("defaults", "maxima"):
            given = table.get(part, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"{where}.{part}: expected a table of limits, e.g. "
                                  "wall_ms = 5000")
            parts.append(dict(given))
        try:
            limits = PolicyLimits(Limits.from_dict(parts[0], f"{where}.defaults"),
                                  Limits.from_dict(parts[1], f"{where}.maxima"))
            limits.applied_to(profile)
        except PolicyError as e:
            raise ConfigError(str(e)) from None
        out[name] = limits
    return out


def _build(raw: Mapping[str, Any]) -> BuildConfig:
    known = {"policy", "timeout_s", "max_context_bytes", "max_context_entries"}
    if set(raw) - known:
        raise ConfigError(f"build.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    default, context = BuildConfig(), ContextLimits()
    return BuildConfig(
        policy=_str(raw.get("policy", default.policy), "build.policy"),
        timeout_s=_seconds(raw.get("timeout_s", default.timeout_s), "build.timeout_s"),
        context=ContextLimits(
            max_bytes=_int(raw.get("max_context_bytes", context.max_bytes),
                           "build.max_context_bytes", 1),
            max_entries=_int(raw.get("max_context_entries", context.max_entries),
                             "build.max_context_entries", 1)))


def _timing(raw: Mapping[str, Any]) -> TimingConfig:
    known = {"cpus", "policies", "max_repeat"}
    if set(raw) - known:
        raise ConfigError(f"timing.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    default = TimingConfig()
    policies = raw.get("policies", list(default.policies))
    if not isinstance(policies, list) or not all(isinstance(p, str) and p for p in policies):
        raise ConfigError('timing.policies: expected a list of policy names, e.g. ["judge"]')
    for name in policies:
        try:
            load_profile(name)
        except PolicyError as e:
            raise ConfigError(f"timing.policies: {e}") from None
    cpus = raw.get("cpus")
    try:
        return TimingConfig(
            cpus=None if cpus is None else _str(cpus, "timing.cpus"),
            policies=tuple(policies),
            max_repeat=_int(raw.get("max_repeat", default.max_repeat), "timing.max_repeat", 1))
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def _files(raw: Mapping[str, Any]) -> FileCacheConfig:
    known = {"ttl_s", "max_file_bytes"}
    if set(raw) - known:
        raise ConfigError(f"files.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    default = FileCacheConfig()
    return FileCacheConfig(
        ttl_s=_seconds(raw.get("ttl_s", default.ttl_s), "files.ttl_s"),
        max_file_bytes=_int(raw.get("max_file_bytes", default.max_file_bytes),
                            "files.max_file_bytes", 1))


def _jobs(raw: Mapping[str, Any]) -> JobsConfig:
    default = JobsConfig()
    known = {f.name for f in fields(JobsConfig)}
    if set(raw) - known:
        raise ConfigError(f"jobs.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    hosts = raw.get("callback_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError('jobs.callback_hosts: expected a list of hosts, e.g. '
                          '["hooks.example.com", "10.0.0.5:8080"]')
    for h in hosts:
        try:
            split_host(h)
        except ValueError as e:
            raise ConfigError(f"jobs.callback_hosts: {e}") from None

    def num(key: str) -> float:
        return _seconds(raw.get(key, getattr(default, key)), f"jobs.{key}")

    def count(key: str) -> int:
        return _int(raw.get(key, getattr(default, key)), f"jobs.{key}", 1)

    return JobsConfig(
        callback_hosts=tuple(h.lower().rstrip(".") for h in hosts),
        callback_attempts=count("callback_attempts"),
        callback_timeout_s=num("callback_timeout_s"),
        callback_backoff_s=num("callback_backoff_s"),
        callback_backoff_max_s=num("callback_backoff_max_s"), workers=count("workers"),
        max_queued_per_tenant=count("max_queued_per_tenant"),
        max_kept_per_tenant=count("max_kept_per_tenant"), ttl_s=num("ttl_s"))


def _gojudge(raw: Mapping[str, Any]) -> GojudgeConfig:
    known = {"enabled", "image", "policy", "workdir"}
    if set(raw) - known:
        raise ConfigError(f"gojudge.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("gojudge.enabled: expected true or false")
    image = raw.get("image")
    if image is not None:
        image = _str(image, "gojudge.image")
    elif enabled:
        raise ConfigError('gojudge.image: required when gojudge.enabled is true (go-judge has '
                          'no images: every /run runs in this one), e.g. '
                          '"docker.io/library/gcc:13"')
    policy = raw.get("policy")
    if policy is not None:
        try:
            load_profile(_str(policy, "gojudge.policy"))
        except PolicyError as e:
            raise ConfigError(f"gojudge.policy: {e}") from None
    workdir = _str(raw.get("workdir", "/tmp"), "gojudge.workdir")
    if not workdir.startswith("/") or ".." in workdir.split("/"):
        raise ConfigError(f"gojudge.workdir: {workdir!r} must be an absolute path without "
                          "'..', e.g. \"/tmp\"")
    return GojudgeConfig(enabled=enabled, image=image, policy=policy,
                         workdir=workdir.rstrip("/") or "/")


def _url_host(url: str) -> str | None:
    """The host name of an http(s) URL that has nothing but a scheme, host and port."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/") \
            or "@" in rest or "?" in rest or "#" in rest:
        return None
    try:
        return split_host(rest.rstrip("/").lower())[0].rstrip(".")
    except ValueError:
        return None


def _node(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NODE_NAME.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a node name: 1 to 63 lower-case letters, "
                          "digits and '-', beginning and ending with a letter or digit (a "
                          "pod's name fits), e.g. \"sandboxd-0\"")
    return value


def _base_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or _url_host(value) is None:
        raise ConfigError(f"{where}: {value!r} is not a base URL: http(s)://host:port and "
                          "nothing more, e.g. \"http://10.0.0.2:8643\"")
    return value.rstrip("/")


def _cluster(raw: Mapping[str, Any], env: Mapping[str, str]) -> ClusterConfig:
    known = {f.name for f in fields(ClusterConfig)}
    if set(raw) - known:
        raise ConfigError(f"cluster.{sorted(set(raw) - known)[0]}: unknown setting; known: "
                          f"{', '.join(sorted(known))}")
    node = env.get("SANDBOXD_NODE") or raw.get("node")
    peers = raw.get("peers", {})
    if not isinstance(peers, Mapping):
        raise ConfigError('cluster.peers: expected a table of node names and base URLs, e.g. '
                          '{ n1 = "http://10.0.0.1:8643", n2 = "http://10.0.0.2:8643" }')
    template = raw.get("peer_url")
    if template is not None:
        sample = template.replace("{node}", "n1") if isinstance(template, str) else None
        if sample is None or "{node}" not in template or _url_host(sample) is None:
            raise ConfigError(f"cluster.peer_url: {template!r} is not a base URL with {{node}} "
                              "in its host, e.g. \"http://{node}.sandboxd-nodes:8643\"")
    if node is None and (peers or template is not None):
        raise ConfigError("cluster.node: required with cluster.peers or cluster.peer_url: "
                          "name this node (or set SANDBOXD_NODE, e.g. to the pod's name)")
    default = ClusterConfig()
    return ClusterConfig(
        node=None if node is None else _node(node, "cluster.node"),
        peers={_node(name, "cluster.peers"): _base_url(url, f"cluster.peers.{name}")
               for name, url in peers.items()},
        peer_url=None if template is None else template.rstrip("/"),
        connect_timeout_s=_seconds(raw.get("connect_timeout_s", default.connect_timeout_s),
                                   "cluster.connect_timeout_s"))


def from_dict(data: Mapping[str, Any], env: Mapping[str, str]) -> ServiceConfig:
    unknown = set(data) - {"server", "tokens", "registries", "pools", "limits", "policies",
                           "images", "build", "files", "jobs", "gojudge", "timing", "cluster"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section; known: server, tokens, "
                          "registries, pools, limits, policies, images, build, files, jobs, "
                          "gojudge, timing, cluster")
    server = _table(data, "server")
    known_server = {"host", "port", "state_dir", "session_idle_s", "default_policy",
                    "shutdown_deadline_s", "allowed_hosts"}
    if set(server) - known_server:
        raise ConfigError(f"server.{sorted(set(server) - known_server)[0]}: unknown setting; "
                          f"known: {', '.join(sorted(known_server))}")
    raw_tokens = data.get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ConfigError("tokens: expected an array of tables ([[tokens]])")
    tokens = [_token(t, f"tokens[{i}]") for i, t in enumerate(raw_tokens)]
    for i, t in enumerate(env.get("SANDBOXD_TOKENS", "").split(",")):
        if t.strip():
            tokens.append(_token({"token": t.strip()}, f"SANDBOXD_TOKENS[{i}]"))
    limits_raw = _table(data, "limits")
    names = {f.name for f in fields(ServiceLimits)}
    if set(limits_raw) - names:
        raise ConfigError(f"limits.{sorted(set(limits_raw) - names)[0]}: unknown setting; "
                          f"known: {', '.join(sorted(names))}")
    limits = ServiceLimits(**{k: _int(v, f"limits.{k}", 1) for k, v in limits_raw.items()})
    state = env.get("SANDBOXD_STATE_DIR") or server.get("state_dir")
    if state is None:
        raise ConfigError("server.state_dir: required (or --state-dir / SANDBOXD_STATE_DIR)")
    port = env.get("SANDBOXD_PORT") or server.get("port", 8643)
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"port: {port!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port: {port} is out of range 0-65535")

    def seconds(key: str, default: float) -> float:
        return _seconds(server.get(key, default), f"server.{key}")

    config = ServiceConfig(
        state_dir=Path(_str(state, "server.state_dir")).expanduser(),
        host=_str(env.get("SANDBOXD_HOST") or server.get("host", "127.0.0.1"), "server.host"),
        port=port, tokens=tuple(tokens),
        registries=_table(data, "registries"), pools=_table(data, "pools"), limits=limits,
        session_idle_s=seconds("session_idle_s", 600.0),
        default_policy=_str(server.get("default_policy", "default"), "server.default_policy"),
        shutdown_deadline_s=seconds("shutdown_deadline_s", 10.0),
        policy_limits=_policy_limits(_table(data, "policies")),
        public_images=_public_images(_table(data, "images")),
        build=_build(_table(data, "build")),
        files=_files(_table(data, "files")),
        timing=_timing(_table(data, "timing")),
        jobs=_jobs(_table(data, "jobs")),
        gojudge=_gojudge(_table(data, "gojudge")),
        cluster=_cluster(_table(data, "cluster"), env),
        allowed_hosts=_hosts(server.get("allowed_hosts", [])))
    if len({t.token for t in config.tokens}) != len(config.tokens):
        raise ConfigError("tokens: the same token appears twice")
    seen: dict[str, int] = {}
    for i, t in enumerate(config.tokens):
        if t.name in seen:
            raise ConfigError(f"tokens[{i}].name: {t.name!r} is also tokens[{seen[t.name]}]'s; "
                              "every token is a tenant of its own: give each a unique name")
        seen[t.name] = i
    # Fail at start, not at the first request: the engine reads these two tables.
    config.engine_config()
    return config


def load(path: Path | None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """The file (if any), then the environment, then command-line `overrides` (host, port,
    state_dir) win."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    env = dict(os.environ if env is None else env)
    for key, var in (("host", "SANDBOXD_HOST"), ("port", "SANDBOXD_PORT"),
                     ("state_dir", "SANDBOXD_STATE_DIR")):
        if overrides and overrides.get(key) is not None:
            env[var] = str(overrides[key])
    try:
        return from_dict(data, env)
    except ValueError as e:  # the registries' and pools' own checks
        raise ConfigError(str(e)) from None
