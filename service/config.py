"""The service's configuration: a TOML file, then environment overrides.

    tokens_file = "PATH"  a TOML file of [[tokens]] entries (mode 0600), read as if inline
    [server]   host, port, state_dir, session_idle_s, default_policy, shutdown_deadline_s,
               allowed_hosts (names besides loopback ones clients reach the service by),
               log_format ("text" or "json")
    [[tokens]] token, name (the tenant: unique), max_concurrent_runs, registries (allowed
               registry hosts), max_sessions, max_image_bytes, max_file_bytes, max_files
               (the tenant's quotas), proxy_hosts (added to network.proxy_hosts for it),
               operator (its /metrics scrapes carry request ids)
    [network]  full (the operator enables network = "full"), proxy_hosts (hosts every tenant
               may reach through the proxy: "host" or "*.domain", optional ":port"), blocked
               (CIDR ranges never reached; default the private, loopback, link-local, CGNAT)
    [registries."host"] ... (sandbox.images.registry.config.RegistriesConfig.from_dict)
    [pools]    min_idle, max_idle, max_live (sandbox.engine.pool.PoolConfig)
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

Every table is a msgspec Struct below (`ServiceFile` the whole file): its fields are the
keys, with their ranges and defaults; sandbox.configfile.read checks a file against them.
What one key alone cannot say (a token twice, a policy that does not exist, gojudge.image
required when enabled) is checked in `from_dict` once the file has been read.

Environment: SANDBOXD_TOKENS (comma-separated), SANDBOXD_STATE_DIR, SANDBOXD_HOST,
SANDBOXD_PORT, SANDBOXD_NODE (cluster.node: e.g. a pod's name) override the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from sandbox import (
    DEFAULT_BLOCKED,
    LOCAL_TENANT,
    BuildConfig,
    ConfigTable,
    ContextLimits,
    EngineConfig,
    FileCacheConfig,
    Invalid,
    Limits,
    PolicyError,
    PolicyLimits,
    PoolConfig,
    PublicNames,
    RegistriesConfig,
    SandboxError,
    Tenant,
    TimingConfig,
    config_table_of,
    load_profile,
    read_config,
)
from service.configvalues import (
    NODE_NAME,
    BaseUrl,
    CallbackHost,
    Cidr,
    Count,
    HostName,
    NodeName,
    PeerUrl,
    ProxyHost,
    Quota,
    Seconds,
    Text,
    Workdir,
    url_host,
)

MiB = 1 << 20


class ConfigError(SandboxError):
    """The service's configuration is invalid; the message names the setting."""


class TokenConfig(ConfigTable):
    token: Annotated[str, Meta(min_length=16, pattern=r"^[^\x00]*$", description=(
        "a secret of at least 16 characters, e.g. from "
        "`python -c 'import secrets; print(secrets.token_urlsafe())'`"))]
    name: Text = ""                             # the tenant's id: unique, stable
    max_concurrent_runs: Count | None = None    # runs at once (running or queued)
    registries: tuple[Text, ...] | None = None  # registry hosts it may use; None: any
    max_sessions: Quota | None = None           # None: limits.sessions_per_tenant
    max_image_bytes: Quota | None = None        # None: limits.image_bytes_per_tenant
    max_file_bytes: Quota | None = None         # None: limits.file_bytes_per_tenant
    max_files: Quota | None = None              # None: limits.files_per_tenant
    # hosts this tenant may reach through the proxy, besides network.proxy_hosts
    proxy_hosts: tuple[ProxyHost, ...] = ()
    # /metrics in OpenMetrics carries request ids (exemplars) to this token only: they are
    # every tenant's, and a client may choose its own
    operator: bool = False

    def __post_init__(self) -> None:
        # Unnamed, a token's tenant is named after the token's hash: stable when the list
        # is reordered (its images and sessions stay its own), and no secret in logs.
        if not self.name:
            msgspec.structs.force_setattr(
                self, "name", "token-" + hashlib.sha256(self.token.encode()).hexdigest()[:12])


class ServiceLimits(ConfigTable):
    json_body_bytes: Count = 16 * MiB
    import_body_bytes: Count = 256 * MiB
    file_body_bytes: Count = 64 * MiB           # PUT /v1/containers/{id}/files
    files_count: Count = 256                    # files in one run request
    files_bytes: Count = 16 * MiB               # their decoded contents together
    max_running: Count = 64                     # runs executing at once, service-wide
    max_queued: Count = 256                     # runs waiting for a slot; then 429
    sessions_per_tenant: Count = 32             # sessions a tenant keeps at once; then 429
    image_bytes_per_tenant: Count = 32 << 30    # what its images use (blobs + layers); 413
    file_bytes_per_tenant: Count = 1 << 30      # what its cached files hold; then 413
    files_per_tenant: Count = 10_000            # how many cached files it keeps; then 429
    batch_cases: Count = 10_000                 # cases in one batch (POST /v1/batches)


class JobsConfig(ConfigTable):
    """Async jobs (service/jobs): how many run at once, what a tenant may keep, and where
    and how their callbacks go."""

    callback_hosts: tuple[CallbackHost, ...] = ()   # a callback_url must name one of them
    callback_attempts: Count = 6                # deliveries tried, the first included
    callback_timeout_s: Seconds = 10.0          # one attempt, connect to answer
    callback_backoff_s: Seconds = 1.0           # the wait before a retry: random, up to
    callback_backoff_max_s: Seconds = 60.0      # backoff_s * 2^(attempt-1), at most this
    workers: Count = 4                          # jobs running at once, service-wide
    max_queued_per_tenant: Count = 1000         # queued or running; then 429
    max_kept_per_tenant: Count = 10_000         # any status, until deleted or expired; 429
    ttl_s: Seconds = 86400.0                    # a finished job is kept this long


@dataclass(frozen=True)
class GojudgeConfig:
    """go-judge's API (service/api/gojudge.py). go-judge has no images: every /run of it
    runs in `image` under `policy`, its relative paths below `workdir` (a directory every
    run may write: /tmp is a tmpfs of every profile). A dataclass: a request's image
    replaces `image`; the file's [gojudge] table is `GojudgeTable`, made of its fields."""

    enabled: bool = False
    image: Text | None = None                   # required when enabled
    policy: Text | None = None                  # None: server.default_policy
    workdir: Workdir = "/tmp"                   # the type is its format; the value a str


GojudgeTable = config_table_of(GojudgeConfig)


class ClusterConfig(ConfigTable):
    """Many nodes (service/cluster/): a session or job lives on the node that made it, its id
    begins with that node's name and a '.', and a request for it that reaches another node
    is forwarded to the owner, found in `peers` or else through `peer_url`."""

    node: NodeName | None = None                # None: a single node, ids without a node
    peers: dict[NodeName, BaseUrl] = msgspec.field(default_factory=dict)  # name -> base URL
    peer_url: PeerUrl | None = None             # e.g. "http://{node}.sandboxd-nodes:8643"
    connect_timeout_s: Seconds = 2.0            # a peer not connected by then is gone (410)

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
        host = None if url is None else url_host(url)
        return () if host is None else (host,)


class NetworkConfig(ConfigTable):
    """A run's network beyond `none` (sandbox/runtime/network/, service/netproxy.py)."""

    full: bool = False                          # the operator enables network = "full"
    # hosts every tenant may reach through the proxy: "host" or "*.domain", optional ":port"
    proxy_hosts: tuple[ProxyHost, ...] = ()
    # what `full` and the proxy never reach (the host's own addresses neither)
    blocked: tuple[Cidr, ...] = tuple(Cidr(n) for n in DEFAULT_BLOCKED)


class ServerTable(ConfigTable):
    host: Text = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8643
    state_dir: Text | None = None               # required, here or from the environment
    session_idle_s: Seconds = 600.0
    default_policy: Text = "default"
    shutdown_deadline_s: Seconds = 10.0
    # Host names (besides localhost, IP addresses and `host`) that requests may name in
    # their Host header; any other is refused, which defeats DNS rebinding.
    allowed_hosts: tuple[HostName, ...] = ()
    log_format: Literal["text", "json"] = "text"


_FILES, _BUILD, _CONTEXT, _TIMING = FileCacheConfig(), BuildConfig(), ContextLimits(), \
    TimingConfig()


class FilesTable(ConfigTable):
    ttl_s: Seconds = _FILES.ttl_s
    max_file_bytes: Count = _FILES.max_file_bytes


class BuildTable(ConfigTable):
    policy: Text = _BUILD.policy
    timeout_s: Seconds = _BUILD.timeout_s
    max_context_bytes: Count = _CONTEXT.max_bytes
    max_context_entries: Count = _CONTEXT.max_entries


class TimingTable(ConfigTable):
    cpus: Text | None = None
    policies: tuple[Text, ...] = _TIMING.policies
    max_repeat: Count = _TIMING.max_repeat


class ImagesTable(ConfigTable):
    public: tuple[str, ...] = ()  # image names or patterns (sandbox.images.public.PublicNames)


class PolicyTable(ConfigTable):
    """A profile's limits (sandbox.runtime.profiles.Limits reads each table)."""

    defaults: dict[str, Any] = msgspec.field(default_factory=dict)
    maxima: dict[str, Any] = msgspec.field(default_factory=dict)


class ServiceFile(ConfigTable):
    tokens_file: Text | None = None
    server: ServerTable = ServerTable()
    tokens: tuple[TokenConfig, ...] = ()
    # RegistriesConfig.from_dict reads it: hosts are its keys, each a table of its own
    registries: dict[str, Any] = msgspec.field(default_factory=dict)
    pools: PoolConfig = PoolConfig()
    limits: ServiceLimits = ServiceLimits()
    policies: dict[str, PolicyTable] = msgspec.field(default_factory=dict)
    images: ImagesTable = ImagesTable()
    build: BuildTable = BuildTable()
    files: FilesTable = FilesTable()
    jobs: JobsConfig = JobsConfig()
    gojudge: GojudgeTable = GojudgeTable()
    timing: TimingTable = TimingTable()
    cluster: ClusterConfig = ClusterConfig()
    network: NetworkConfig = NetworkConfig()


class TokensFile(ConfigTable):
    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """The service's settings: the file's tables, the environment's overrides applied."""

    state_dir: Path
    host: str
    port: int
    tokens: tuple[TokenConfig, ...]
    registries: Mapping[str, Any]
    pools: PoolConfig
    limits: ServiceLimits
    session_idle_s: float
    default_policy: str
    shutdown_deadline_s: float
    policy_limits: Mapping[str, PolicyLimits]
    public_images: PublicNames
    build: BuildConfig
    files: FileCacheConfig
    timing: TimingConfig
    jobs: JobsConfig
    gojudge: GojudgeConfig
    cluster: ClusterConfig
    allowed_hosts: tuple[str, ...]              # see ServerTable
    network: NetworkConfig
    log_format: str                             # "text" | "json" (service/logs.py)
    tokens_file: Path | None                    # where some of `tokens` came from

    def engine_config(self) -> EngineConfig:
        return EngineConfig(state_dir=self.state_dir,
                            registries=RegistriesConfig.from_dict(self.registries),
                            pools=self.pools,
                            session_idle_s=self.session_idle_s,
                            default_policy=self.default_policy,
                            policy_limits=self.policy_limits,
                            public_images=self.public_images, build=self.build,
                            files=self.files, timing=self.timing, node=self.cluster.node,
                            network_blocked=tuple(self.network.blocked))

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


def _profile(name: str, where: str) -> None:
    """A policy the config names must exist: fail at start, not at the first run."""
    try:
        load_profile(name)
    except PolicyError as e:
        raise ConfigError(f"{where}: {e}") from None


def _policy_limits(tables: Mapping[str, PolicyTable]) -> dict[str, PolicyLimits]:
    """[policies.<profile>] tables, checked against the profiles they change: an unknown
    profile or limit, or a default left above its maximum, fails here rather than at runs."""
    out = {}
    for name, table in tables.items():
        where = f"policies.{name}"
        _profile(name, where)
        try:
            limits = PolicyLimits(Limits.from_dict(table.defaults, f"{where}.defaults"),
                                  Limits.from_dict(table.maxima, f"{where}.maxima"))
            limits.applied_to(load_profile(name))
        except PolicyError as e:
            raise ConfigError(str(e)) from None
        out[name] = limits
    return out


def _tokens_file(value: str, base: Path | None) -> tuple[Path, TokensFile]:
    """tokens_file: its path and its tokens. Like ssh with a private key, a file others may
    read (or write) is refused: its tokens are the service's passwords."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o066:
                raise ConfigError(f"tokens_file: {path} has mode {mode & 0o777:04o}, so other "
                                  f"users may read or change its tokens: run "
                                  f"`chmod 600 {path}`")
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"tokens_file: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"tokens_file: {path}: not valid TOML: {e}") from None
    try:
        return path, read_config(data, TokensFile)
    except Invalid as e:
        raise ConfigError(f"{path}: {e}") from None


def _with_environment(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The file's tables with the environment's values in place of its own."""
    out = dict(data)
    server = out.get("server", {})
    if isinstance(server, Mapping):
        server = dict(server)
        for key, var in (("state_dir", "SANDBOXD_STATE_DIR"), ("host", "SANDBOXD_HOST")):
            if env.get(var):
                server[key] = env[var]
        if env.get("SANDBOXD_PORT"):
            try:
                server["port"] = int(env["SANDBOXD_PORT"])
            except ValueError:
                raise ConfigError(f"SANDBOXD_PORT: {env['SANDBOXD_PORT']!r} is not a number; "
                                  "give a port from 0 to 65535") from None
        out["server"] = server
    cluster = out.get("cluster", {})
    if env.get("SANDBOXD_NODE") and isinstance(cluster, Mapping):
        out["cluster"] = {**cluster, "node": env["SANDBOXD_NODE"]}
    return out


def from_dict(data: Mapping[str, Any], env: Mapping[str, str],
              base: Path | None = None) -> ServiceConfig:
    """`base`: the directory a relative tokens_file is in (the config file's)."""
    try:
        file = read_config(_with_environment(data, env), ServiceFile)
    except Invalid as e:
        raise ConfigError(str(e)) from None
    server = file.server
    if server.state_dir is None:
        raise ConfigError("server.state_dir: required (or --state-dir / SANDBOXD_STATE_DIR)")
    tokens = list(file.tokens)
    places = [f"tokens[{i}]" for i in range(len(tokens))]
    tokens_file = None
    if file.tokens_file is not None:
        tokens_file, more = _tokens_file(file.tokens_file, base)
        tokens += more.tokens
        places += [f"{tokens_file} tokens[{i}]" for i in range(len(more.tokens))]
    for i, t in enumerate(env.get("SANDBOXD_TOKENS", "").split(",")):
        if t.strip():
            place = f"SANDBOXD_TOKENS[{i}]"
            try:
                tokens.append(read_config({"token": t.strip()}, TokenConfig, place))
            except Invalid as e:
                raise ConfigError(str(e)) from None
            places.append(place)
    _check_tokens(tokens, places)
    gojudge = GojudgeConfig(*msgspec.structs.astuple(file.gojudge))
    if gojudge.enabled and gojudge.image is None:
        raise ConfigError('gojudge.image: required when gojudge.enabled is true (go-judge has '
                          'no images: every /run runs in this one), e.g. '
                          '"docker.io/library/gcc:13"')
    if gojudge.policy is not None:
        _profile(gojudge.policy, "gojudge.policy")
    for name in file.timing.policies:
        _profile(name, "timing.policies")
    if file.cluster.node is None and (file.cluster.peers or file.cluster.peer_url is not None):
        raise ConfigError("cluster.node: required with cluster.peers or cluster.peer_url: "
                          "name this node (or set SANDBOXD_NODE, e.g. to the pod's name)")
    try:
        public = PublicNames.parse(list(file.images.public))
        timing = TimingConfig(cpus=file.timing.cpus, policies=file.timing.policies,
                              max_repeat=file.timing.max_repeat)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    build = file.build
    config = ServiceConfig(
        state_dir=Path(server.state_dir).expanduser(), host=server.host, port=server.port,
        tokens=tuple(tokens), registries=file.registries, pools=file.pools,
        limits=file.limits, session_idle_s=server.session_idle_s,
        default_policy=server.default_policy, shutdown_deadline_s=server.shutdown_deadline_s,
        policy_limits=_policy_limits(file.policies), public_images=public,
        build=BuildConfig(policy=build.policy, timeout_s=build.timeout_s,
                          context=ContextLimits(max_bytes=build.max_context_bytes,
                                                max_entries=build.max_context_entries)),
        files=FileCacheConfig(ttl_s=file.files.ttl_s,
                              max_file_bytes=file.files.max_file_bytes),
        timing=timing, jobs=file.jobs, gojudge=gojudge, cluster=file.cluster,
        allowed_hosts=server.allowed_hosts, network=file.network,
        log_format=server.log_format, tokens_file=tokens_file)
    # Fail at start, not at the first request: the engine reads the registries' table.
    config.engine_config()
    return config


def _check_tokens(tokens: list[TokenConfig], places: list[str]) -> None:
    """Every token once, every tenant's name once; an error names both places."""
    secrets: dict[str, str] = {}
    seen: dict[str, str] = {}
    for place, t in zip(places, tokens, strict=True):
        if t.token in secrets:
            raise ConfigError(f"{place}.token: the same token as {secrets[t.token]}: every "
                              "token appears once; remove one of them")
        secrets[t.token] = place
        if t.name in seen:
            raise ConfigError(f"{place}.name: {t.name!r} is also {seen[t.name]}'s; every "
                              "token is a tenant of its own: give each a unique name")
        seen[t.name] = place


def load(path: Path | None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """The file (if any), then the environment, then command-line `overrides` (host, port,
    state_dir) win. An error begins with the file's path, then the key's."""
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
        return from_dict(data, env, None if path is None else Path(path).parent)
    except (ConfigError, ValueError) as e:  # ValueError: the registries' own checks
        raise ConfigError(str(e) if path is None else f"{path}: {e}") from None
