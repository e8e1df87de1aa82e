"""A Docker token server for a registry in `auth: token` mode.

It implements the GET flow of distribution's token spec: `GET /token?service=S&scope=…`
with optional Basic credentials answers `{"token", "access_token", "expires_in",
"issued_at"}`. Tokens are ES256 JWTs whose header carries the signing certificate (`x5c`);
distribution 2.8 accepts a token when that chain verifies against its `rootcertbundle`, and
the certificate here is self-signed and is that bundle. Anonymous callers get `pull` on
repositories under the public prefix; known users get every action they ask for.

A hostile token server too: `answer_next(status, headers, body)` queues answers given instead
of the next tokens (a redirect to an internal name, an internal error page), and `seen` lists
every request's (method, path, Authorization) so a test can tell it was never asked.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from testbed.registry import TokenSettings

SERVICE = "sandboxd-test-registry"
ISSUER = "sandboxd-test-token-server"
USER_ACTIONS = frozenset({"pull", "push", "delete", "*"})


@dataclass(frozen=True)
class Canned:
    """An answer given instead of the token flow's."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens on `bind` (127.0.0.1); `issued` lists (account, granted
    scopes), with account "" for anonymous requests. Stop it with `close()` or use it as a
    context manager."""

    def __init__(self, workdir: Path, users: dict[str, str], *, expires_in: int = 300,
                 public_prefix: str = "public/", service: str = SERVICE,
                 issuer: str = ISSUER, bind: str = "127.0.0.1") -> None:
        self.users = dict(users)
        self.expires_in = expires_in
        self.public_prefix = public_prefix
        self.service = service
        self.issuer = issuer
        self.issued: list[tuple[str, tuple[str, ...]]] = []
        self.refused = 0  # requests with credentials that did not match
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._canned: list[Canned] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        cert = self._self_signed_certificate()
        workdir.mkdir(parents=True, exist_ok=True)
        self.certificate = workdir / "token-signer.pem"
        self.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._header = _b64url(orjson.dumps({
            "typ": "JWT", "alg": "ES256",
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        }))
        self._server = ThreadingHTTPServer((bind, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.host = f"{bind}:{self.port}"
        self.url = f"http://{self.host}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="token-server", daemon=True)
        self._thread.start()

    @property
    def settings(self) -> TokenSettings:
        """What `start_registry(auth="token", token=…)` needs to trust this server."""
        return TokenSettings(realm=self.realm, service=self.service, issuer=self.issuer,
                             rootcertbundle=self.certificate)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def answer_next(self, status: int, headers: dict[str, str] | None = None,
                    body: bytes = b"") -> None:
        """Answer the next request (any method, any path) so, instead of the token flow."""
        with self._lock:
            self._canned.append(Canned(status, dict(headers or {}), body))

    def take(self, method: str, path: str, authorization: str | None) -> Canned | None:
        """Record a request; the canned answer it gets, if one is queued."""
        with self._lock:
            self.seen.append((method, path, authorization))
            return self._canned.pop(0) if self._canned else None

    def grant(self, account: str, scopes: list[str]) -> list[tuple[str, str, list[str]]]:
        """(type, name, actions) granted to `account` ("" = anonymous) for `scopes`."""
        granted = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            # The name may hold a host:port, so the actions are after the last colon.
            name, _, actions_text = rest.rpartition(":")
            wanted = [a for a in actions_text.split(",") if a]
            if not name or not wanted:
                continue
            if account:
                allowed = [a for a in wanted if a in USER_ACTIONS]
            elif kind == "repository" and name.startswith(self.public_prefix):
                allowed = [a for a in wanted if a == "pull"]
            else:
                allowed = []
            if allowed:
                granted.append((kind, name, allowed))
        return granted

    def make_token(self, account: str, access: list[tuple[str, str, list[str]]],
                   now: float) -> str:
        claims = {
            "iss": self.issuer, "sub": account, "aud": self.service,
            "exp": int(now) + self.expires_in, "nbf": int(now) - 1, "iat": int(now),
            "jti": secrets.token_hex(16),
            "access": [{"type": k, "name": n, "actions": a} for k, n, a in access],
        }
        signing_input = f"{self._header}.{_b64url(orjson.dumps(claims))}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JWS ES256 wants the raw 32-byte r and s, not DER.
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def account_for(self, authorization: str | None) -> str | None:
        """The user named by Basic credentials, "" without credentials, None if wrong."""
        if not authorization:
            return ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except ValueError:
            return None
        if name in self.users and secrets.compare_digest(self.users[name], password):
            return name
        return None

    def record(self, account: str, access: list[tuple[str, str, list[str]]]) -> None:
        with self._lock:
            self.issued.append((account, tuple(f"{k}:{n}:{','.join(a)}"
                                               for k, n, a in access)))

    def _self_signed_certificate(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.UTC)
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self._canned():
                return
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
                return
            query = urllib.parse.parse_qs(url.query)
            if query.get("service", [""])[0] != server.service:
                self._reply(400, {"errors": [{"code": "INVALID_SERVICE",
                                              "message": f"service must be {server.service}"}]})
                return
            account = server.account_for(self.headers.get("Authorization"))
            if account is None:
                with server._lock:
                    server.refused += 1
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                              "message": "wrong user name or password"}]},
                            {"WWW-Authenticate": 'Basic realm="sandboxd-test-token"'})
                return
            # A scope parameter may also hold several scopes separated by spaces.
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            access = server.grant(account, scopes)
            now = time.time()
            token = server.make_token(account, access, now)
            server.record(account, access)
            issued_at = dt.datetime.fromtimestamp(int(now), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._reply(200, {"token": token, "access_token": token,
                              "expires_in": server.expires_in, "issued_at": issued_at})

        def do_POST(self) -> None:
            # Only the GET flow: OAuth2 clients fall back to it on a 404.
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, 1 << 20))
            self.close_connection = True
            if self._canned():
                return
            self._reply(404, {"errors": [{"code": "UNSUPPORTED",
                                          "message": "use GET for tokens"}]})

        def _canned(self) -> bool:
            canned = server.take(self.command, self.path, self.headers.get("Authorization"))
            if canned is None:
                return False
            self.send_response(canned.status)
            for k, v in canned.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(canned.body)))
            self.end_headers()
            self.wfile.write(canned.body)
            return True

        def _reply(self, status: int, body: object, headers: dict[str, str] | None = None
                   ) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the tests read `issued`, not a log

    return Handler
