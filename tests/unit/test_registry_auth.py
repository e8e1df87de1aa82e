"""WWW-Authenticate parsing, token requests and the token cache (with a fake token sender and
clock: the token server is outside the unit)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sandbox.errors import AuthError
from sandbox.images.registry.auth import Authenticator, Challenge, merge_scopes, parse_challenges
from sandbox.images.registry.config import RegistriesConfig, RegistryConfig
from sandbox.images.registry.credentials import CredentialStore
from sandbox.images.registry.transport import Reply


def test_several_challenges_in_one_header_with_quoted_commas() -> None:
    got = parse_challenges([
        'Basic realm="a, b", Bearer realm="https://auth.example/token",'
        'service="registry.example",scope="repository:a/b:pull,push"'])
    assert got == [
        Challenge("basic", {"realm": "a, b"}),
        Challenge("bearer", {"realm": "https://auth.example/token",
                             "service": "registry.example",
                             "scope": "repository:a/b:pull,push"})]


def test_several_headers_case_escapes_and_bare_tokens() -> None:
    got = parse_challenges(['BEARER Realm="x\\"y" , Error=insufficient_scope', "Negotiate",
                            'Basic realm=plain'])
    assert got == [Challenge("bearer", {"realm": 'x"y', "error": "insufficient_scope"}),
                   Challenge("negotiate", {}), Challenge("basic", {"realm": "plain"})]


@pytest.mark.parametrize("junk", ["", ",,,", '"', "=", "Bearer realm=", 'Bearer realm="open',
                                  "\x00\xff==", "a b c d", "Basic abc==, Bearer x=1" * 2000])
def test_hostile_headers_never_raise(junk: str) -> None:
    parse_challenges([junk])


def test_merge_scopes_puts_new_ones_first_without_duplicates() -> None:
    assert merge_scopes(["b", "a"], ["a", "c"]) == ("b", "a", "c")


@dataclass
class Target:
    name: str = "reg.example"
    cred_host: str = "reg.example"
    challenges: list[Challenge] = field(default_factory=list)
    allow_http: bool = False
    ssl: object = True
    home: str | None = None  # as the client's _Host: its own name when it may be local
    configured: tuple[str, ...] = ()

    def may_be_local(self, host: str) -> bool:
        return host == self.home or host in self.configured


@dataclass
class FakeTokenServer:
    """Answers token requests from a script; records them."""

    answers: list[tuple[int, dict]] = field(default_factory=list)
    seen: list[tuple[str, URL, dict, dict | None]] = field(default_factory=list)

    async def __call__(self, target: object, method: str, url: URL, headers: dict,
                       form: dict | None) -> Reply:
        self.seen.append((method, url, headers, form))
        status, body = self.answers.pop(0) if self.answers else (200, {"token": "t"})
        return Reply(status, CIMultiDictProxy(CIMultiDict()), orjson.dumps(body), url)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(realm: str = "https://auth.example/token") -> Challenge:
    return Challenge("bearer", {"realm": realm, "service": "svc"})


def authenticator(server: FakeTokenServer, clock: Clock | None = None,
                  user: tuple[str, str] | None = None) -> Authenticator:
    regs = {"reg.example": RegistryConfig("reg.example", username=user[0], password=user[1])
            } if user else {}
    return Authenticator(server, CredentialStore(RegistriesConfig(registries=regs)),
                         clock=clock or Clock())


def test_token_request_and_cache_until_expiry() -> None:
    server = FakeTokenServer([(200, {"access_token": "one", "expires_in": 300}),
                              (200, {"token": "two", "expires_in": 5})])
    clock = Clock()
    auth = authenticator(server, clock, user=("u", "p"))
    target = Target(challenges=[bearer()])
    scopes = ("repository:new:pull", "repository:old:pull")

    async def go() -> list[str | None]:
        out = [await auth.header(target, scopes), await auth.header(target, scopes[::-1])]
        clock.now += 290  # still inside 300 s
        out.append(await auth.header(target, scopes))
        clock.now += 20
        out.append(await auth.header(target, scopes))
        clock.now += 30  # "expires_in": 5 counts as the 60 s minimum
        out.append(await auth.header(target, scopes))
        clock.now += 40
        out.append(await auth.header(target, scopes))
        return out

    assert asyncio.run(go()) == ["Bearer one", "Bearer one", "Bearer one", "Bearer two",
                                 "Bearer two", "Bearer t"]
    method, url, headers, form = server.seen[0]
    assert method == "GET" and form is None
    assert url.host == "auth.example"
    assert parse_qs(url.query_string) == {"service": ["svc"], "scope": list(scopes)}
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert len(server.seen) == 3


def test_anonymous_token_has_no_authorization() -> None:
    server = FakeTokenServer()
    asyncio.run(authenticator(server).header(Target(challenges=[bearer()]), ("s",)))
    assert "Authorization" not in server.seen[0][2]


def test_insufficient_scope_asks_again_with_its_scope_first() -> None:
    auth = authenticator(FakeTokenServer())
    target = Target(challenges=[bearer()])
    got = auth.after_unauthorized(target, ("repository:a:pull",), parse_challenges([
        'Bearer realm="https://auth.example/token",service="svc",'
        'scope="repository:b:pull repository:a:push,pull",error="insufficient_scope"']))
    assert got == ("repository:b:pull", "repository:a:push,pull", "repository:a:pull")
    assert auth.after_unauthorized(target, ("s",), parse_challenges(['Basic realm="x"'])) is None


def test_identity_token_uses_oauth2_then_falls_back_to_get() -> None:
    server = FakeTokenServer([(404, {}), (200, {"token": "from-get"})])
    regs = {"reg.example": RegistryConfig("reg.example", username="<token>",
                                          password="refresh-xyz")}
    auth = Authenticator(server, CredentialStore(RegistriesConfig(registries=regs)))
    got = asyncio.run(auth.header(Target(challenges=[bearer()]), ("repository:a:pull",)))
    assert got == "Bearer from-get"
    (m1, _, _, form), (m2, _, _, _) = server.seen
    assert (m1, m2) == ("POST", "GET")
    assert form == {"grant_type": "refresh_token", "refresh_token": "refresh-xyz",
                    "client_id": "sandboxd", "scope": "repository:a:pull", "service": "svc"}


def test_basic_challenge_sends_credentials_directly() -> None:
    server = FakeTokenServer()
    auth = authenticator(server, user=("u", "p"))
    got = asyncio.run(auth.header(Target(challenges=[Challenge("basic", {})]), ("s",)))
    assert got == "Basic " + base64.b64encode(b"u:p").decode()
    assert server.seen == []
    assert asyncio.run(authenticator(server).header(
        Target(challenges=[Challenge("basic", {})]), ("s",))) is None


@pytest.mark.parametrize(("realm", "target", "problem"), [
    ("http://auth.example/token", Target(), "plain-HTTP"),
    ("https://127.0.0.1/token", Target(), "local or private"),
    ("https://[::ffff:10.0.0.1]/token", Target(), "local or private"),
    ("https://169.254.169.254/latest", Target(), "local or private"),
    ("ftp://auth.example/", Target(), "not an http"),
])
def test_realm_checks(realm: str, target: Target, problem: str) -> None:
    target.challenges = [bearer(realm)]
    server = FakeTokenServer()
    with pytest.raises(AuthError, match=problem):
        asyncio.run(authenticator(server).header(target, ("s",)))
    assert server.seen == []


def test_local_realm_allowed_on_the_registrys_own_host_or_a_configured_one() -> None:
    target = Target(name="127.0.0.1:5000", cred_host="127.0.0.1:5000", allow_http=True,
                    home="127.0.0.1", configured=("10.0.0.7",),
                    challenges=[bearer("http://127.0.0.1:5001/token")])
    assert asyncio.run(authenticator(FakeTokenServer()).header(target, ("s",))) == "Bearer t"
    target.challenges = [bearer("http://10.0.0.7/token")]
    assert asyncio.run(authenticator(FakeTokenServer()).header(target, ("t",))) == "Bearer t"


@pytest.mark.parametrize("realm", ["http://localhost:5001/token", "http://127.0.0.2/token",
                                   "http://[::1]:5001/token"])
def test_a_local_registry_may_not_send_us_to_another_local_host(realm: str) -> None:
    target = Target(name="127.0.0.1:5000", cred_host="127.0.0.1:5000", allow_http=True,
                    home="127.0.0.1", challenges=[bearer(realm)])
    server = FakeTokenServer()
    with pytest.raises(AuthError, match="local or private"):
        asyncio.run(authenticator(server).header(target, ("s",)))
    assert server.seen == []


@pytest.mark.parametrize(("status", "body", "problem"), [
    (401, {}, "refused the credentials for u"),
    (200, {"nothing": 1}, "without a token"),
    (500, {"errors": [{"code": "X", "message": "boom"}]}, "X: boom"),
])
def test_token_server_failures(status: int, body: dict, problem: str) -> None:
    auth = authenticator(FakeTokenServer([(status, body)]), user=("u", "p-secret"))
    with pytest.raises(AuthError, match=problem) as info:
        asyncio.run(auth.header(Target(challenges=[bearer()]), ("s",)))
    assert "p-secret" not in str(info.value)
