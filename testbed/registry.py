"""A throwaway loopback registry: Debian's `docker-registry` (distribution 2.8) with its
storage under a work directory, for the tests, the demo and the benchmarks.

`start_registry` picks a free 127.0.0.1 port, writes the config (and, when asked, an
htpasswd file and a TLS certificate made with the `openssl` CLI), starts
`docker-registry serve CONFIG`, and returns once the server answers. The registry's access
log (its stdout) lets callers see what it served, e.g. how often a blob was downloaded.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from sandbox.errors import SandboxError
from testbed.ports import free_port, stop_process

REGISTRY_PROGRAM = "docker-registry"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 5

AuthMode = Literal["none", "htpasswd", "token"]

# Gorilla's combined log format, which the registry writes to stdout for each response:
# 127.0.0.1 - - [27/Nov/2026:20:58:59 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) ')
# Our own probes and log markers go to "/", which the registry answers without the API.
_MARKER_QUERY = "sandboxd-localregistry="


@dataclass(frozen=True)
class TokenSettings:
    """What the registry needs for `auth: token`: where clients get tokens, the service
    and issuer names the tokens must carry, and the PEM certificates whose keys sign them."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


class LocalRegistry:
    """A running `docker-registry`; stop it with `stop()` or use it as a context manager."""

    def __init__(self, *, process: subprocess.Popen[bytes], workdir: Path, port: int,
                 auth: AuthMode, ca_file: Path | None, users: dict[str, str],
                 access_log: Path, error_log: Path, log_files: list[IO[bytes]]) -> None:
        self.process = process
        self.workdir = workdir
        self.port = port
        self.auth: AuthMode = auth
        self.host = f"127.0.0.1:{port}"
        self.url = f"{'https' if ca_file else 'http'}://{self.host}"
        self.ca_file = ca_file
        self.users = dict(users)
        # The first user, for the common single-account case.
        first = next(iter(users.items()), None)
        self.username: str | None = first[0] if first else None
        self.password: str | None = first[1] if first else None
        self.access_log = access_log
        self.error_log = error_log
        self._log_files = log_files
        self._markers = itertools.count()

    def __repr__(self) -> str:
        return f"LocalRegistry({self.url}, auth={self.auth}, pid={self.process.pid})"

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL) and close its logs; idempotent."""
        if self.process.poll() is None:
            stop_process(self.process, STOP_TIMEOUT_S)
        for f in self._log_files:
            f.close()
        self._log_files = []

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every response the registry has sent, oldest first.

        The path has no query string. Our own readiness probes and log markers are left
        out. While the registry runs, every request answered before this call is included.
        """
        lines = self._read_log_through_marker()
        out: list[tuple[str, str, int]] = []
        for line in lines:
            m = _ACCESS_LINE.match(line)
            if m is None:
                continue
            method, target, status = m.group(1), m.group(2), int(m.group(3))
            path, _, query = target.partition("?")
            if path == "/" and query.startswith(_MARKER_QUERY):
                continue
            out.append((method, path, status))
        return out

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob `digest` (in any repository) succeeded: 200, or 206 for a
        range."""
        suffix = f"/blobs/{digest}"
        return sum(1 for method, path, status in self.requests()
                   if method == "GET" and path.startswith("/v2/") and path.endswith(suffix)
                   and status in (200, 206))

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting this registry's CA, or None for plain HTTP."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def _read_log_through_marker(self) -> list[str]:
        # The registry logs a response only after writing it, so a client may see a reply
        # before its log line exists. A marker request sent now is logged after every
        # response already received; reading up to it makes the log complete.
        if self.process.poll() is not None:
            return self.access_log.read_text(errors="replace").splitlines()
        marker = f"/?{_MARKER_QUERY}{next(self._markers)}"
        _probe(self.url + marker, self.ssl_context())
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            lines = self.access_log.read_text(errors="replace").splitlines()
            if any(f" {marker} " in line for line in lines):
                return lines
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SandboxError(f"the registry at {self.url} did not log a request within "
                                   f"{START_TIMEOUT_S:.0f} s; see {self.error_log}")
            time.sleep(0.01)


def start_registry(workdir: Path, *, auth: AuthMode = "none", tls: bool = False,
                   users: dict[str, str] | None = None,
                   token: TokenSettings | None = None,
                   die_with_parent: bool = False) -> LocalRegistry:
    """Start `docker-registry` on a free loopback port with its state under `workdir`.

    auth: "none"; "htpasswd" (basic auth for `users`, name -> password); or "token" (the
    Docker token flow, with `token` describing the token server; `users` are then only
    recorded, as `.username`/`.password`). With `tls`, a CA and a server certificate for
    127.0.0.1 are made; `ca_file` is then the CA, alone in its directory so that the
    directory can serve as a containers-style cert dir. With `die_with_parent`, the kernel
    sends the registry SIGTERM when the calling thread exits (even on SIGKILL), so call it
    from a thread that lives as long as the registry should, such as the main thread.
    """
    if shutil.which(REGISTRY_PROGRAM) is None:
        raise SandboxError(f"`{REGISTRY_PROGRAM}` is not installed; install it with "
                           "`apt-get install docker-registry`")
    if auth not in ("none", "htpasswd", "token"):
        raise SandboxError(f"unknown registry auth mode {auth!r}; use none, htpasswd or token")
    if auth == "htpasswd" and not users:
        raise SandboxError("auth='htpasswd' needs users={name: password}")
    if auth == "token" and token is None:
        raise SandboxError("auth='token' needs token=TokenSettings(...) from a token server")
    workdir.mkdir(parents=True, exist_ok=True)
    auth_config = ""
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        _write_htpasswd(htpasswd, users or {})
        auth_config = f"auth:\n  htpasswd:\n    realm: sandboxd-test\n    path: {htpasswd}\n"
    elif auth == "token" and token is not None:
        auth_config = (f"auth:\n  token:\n    realm: {token.realm}\n"
                       f"    service: {token.service}\n    issuer: {token.issuer}\n"
                       f"    rootcertbundle: {token.rootcertbundle}\n")
    ca_file = tls_config = None
    if tls:
        ca_file, cert, key = _make_certificates(workdir / "tls")
        tls_config = f"  tls:\n    certificate: {cert}\n    key: {key}\n"
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)

    last_error = ""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()  # may be taken again before it binds: retried below
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            # No background goroutine deleting uploads while a test pushes.
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            "http:\n"
            f"  addr: 127.0.0.1:{port}\n"
            f"  secret: {secrets.token_hex(16)}\n"
            + (tls_config or "") + auth_config)
        access_log = workdir / f"access-{attempt}.log"
        error_log = workdir / f"registry-{attempt}.log"
        out, err = access_log.open("wb"), error_log.open("wb")
        argv = [REGISTRY_PROGRAM, "serve", str(config)]
        if die_with_parent:
            argv = [*_pdeathsig_wrapper(), *argv]
        process = subprocess.Popen(argv,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   cwd=workdir)
        registry = LocalRegistry(process=process, workdir=workdir, port=port, auth=auth,
                                 ca_file=ca_file, users=users or {}, access_log=access_log,
                                 error_log=error_log, log_files=[out, err])
        try:
            if _wait_ready(registry):
                return registry
        except BaseException:
            registry.stop()
            raise
        registry.stop()
        last_error = error_log.read_text(errors="replace")[-2000:]
        if "address already in use" not in last_error:
            break
    raise SandboxError(f"docker-registry did not start in {workdir}: {last_error.strip()}")


def _pdeathsig_wrapper() -> list[str]:
    # util-linux's setpriv sets the parent-death signal, which survives its execve.
    if shutil.which("setpriv") is None:
        raise SandboxError("die_with_parent needs `setpriv`; install it with "
                           "`apt-get install util-linux`")
    return ["setpriv", "--pdeathsig", "TERM", "--"]


def _probe(url: str, context: ssl.SSLContext | None) -> int:
    """Status of a GET of `url` (which the registry serves without auth)."""
    # No proxy from the environment: this is a loopback server.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _wait_ready(registry: LocalRegistry) -> bool:
    """True once the registry answers; False if it exited (e.g. its port was taken)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"{registry.url}/?{_MARKER_QUERY}ready"
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            _probe(url, registry.ssl_context())
            return True
        time.sleep(0.02)
    raise SandboxError(f"docker-registry did not answer on {registry.url} within "
                       f"{START_TIMEOUT_S:.0f} s; see {registry.error_log}")


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except FileNotFoundError as e:
        raise SandboxError(f"{what}: `{argv[0]}` is not installed ({e})") from e
    except subprocess.CalledProcessError as e:
        raise SandboxError(f"{what} failed: {e.stderr.decode(errors='replace').strip()}") from e


def _write_htpasswd(path: Path, users: dict[str, str]) -> None:
    # distribution only accepts bcrypt entries; `htpasswd -B` (apache2-utils) makes them.
    lines = []
    for name, password in users.items():
        if not name or ":" in name or "\n" in name or "\n" in password:
            raise SandboxError(f"invalid htpasswd user name {name!r}: no ':' or newlines")
        try:
            out = subprocess.run(["htpasswd", "-nbB", name, password], check=True,
                                 capture_output=True, text=True, timeout=60).stdout
        except FileNotFoundError as e:
            raise SandboxError("`htpasswd` is not installed; install it with "
                               "`apt-get install apache2-utils`") from e
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI.
    Returns (ca certificate, server certificate, server key)."""
    ca_dir = directory / "ca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = ca_dir / "ca.crt", directory / "ca.key"
    cert, key = directory / "server.crt", directory / "server.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    _run(["openssl", "req", "-x509", "-new", *ec, "-keyout", str(ca_key), "-out",
          str(ca_cert), "-subj", "/CN=sandboxd test CA",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"], "making a test CA")
    _run(["openssl", "req", "-x509", "-new", *ec, "-keyout", str(key), "-out", str(cert),
          "-subj", "/CN=127.0.0.1", "-CA", str(ca_cert), "-CAkey", str(ca_key),
          "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
          "-addext", "basicConstraints=critical,CA:FALSE",
          "-addext", "extendedKeyUsage=serverAuth"], "making a test server certificate")
    return ca_cert, cert, key
