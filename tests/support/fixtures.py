"""Registry fixtures for every test directory (loaded by `pytest_plugins` in
tests/conftest.py): real `docker-registry` servers, a token server, a fault-injecting proxy
and images built by umoci and skopeo. Every server is stopped when its scope ends, whatever
the tests did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from testbed.registry import LocalRegistry, start_registry
from tests.support.images import AuthImages, PushedImages, build_and_push, copy_to_auth_registries
from tests.support.proxy import FaultProxy
from tests.support.token_server import TokenServer

BASIC_USER = ("alice", "alice-secret-1")
TOKEN_USER = ("bob", "bob-secret-2")
REQUIRED_PROGRAMS = ("docker-registry", "skopeo", "umoci", "htpasswd", "openssl")


def _require_programs() -> None:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(f"registry tests need {', '.join(missing)}; scripts/test.sh installs "
                    "them (apt-get install docker-registry skopeo umoci apache2-utils openssl)")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A plain-HTTP registry without auth."""
    _require_programs()
    with start_registry(tmp_path_factory.mktemp("registry"), die_with_parent=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry with htpasswd basic auth over plain HTTP (distribution does not insist on
    TLS); the account is `.username` / `.password`."""
    _require_programs()
    with start_registry(tmp_path_factory.mktemp("basic-registry"), auth="htpasswd",
                        users=dict([BASIC_USER]), die_with_parent=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """An HTTPS registry without auth; its certificate is signed by the CA in `.ca_file`
    (alone in its directory, usable as a skopeo --cert-dir)."""
    _require_programs()
    with start_registry(tmp_path_factory.mktemp("tls-registry"), tls=True,
                        die_with_parent=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """The token server behind `token_registry`: `.issued` lists (account, scopes) granted,
    account "" when anonymous."""
    with TokenServer(tmp_path_factory.mktemp("token-server"), dict([TOKEN_USER])) as server:
        yield server


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory,
                   token_server: TokenServer) -> Iterator[LocalRegistry]:
    """A registry in `auth: token` mode trusting `token_server`: anonymous pull of
    repositories under public/, the account `.username` / `.password` for everything."""
    _require_programs()
    with start_registry(tmp_path_factory.mktemp("token-registry"), auth="token",
                        token=token_server.settings, users=dict([TOKEN_USER]),
                        die_with_parent=True) as reg:
        yield reg


ProxyFactory = Callable[..., FaultProxy]


@pytest.fixture
def fault_proxy() -> Iterator[ProxyFactory]:
    """Factory: `fault_proxy(upstream)` starts a FaultProxy in front of a LocalRegistry (or
    a URL); every proxy made is closed when the test ends."""
    proxies: list[FaultProxy] = []

    def make(upstream: LocalRegistry | str, *, ca_file: str | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream, ca_file=ca_file)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture(scope="session")
def images(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImages:
    """The test images (see tests/support/images.py), built once and pushed to `registry`."""
    return build_and_push(registry, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def auth_images(images: PushedImages, basic_registry: LocalRegistry,
                token_registry: LocalRegistry,
                tmp_path_factory: pytest.TempPathFactory) -> AuthImages:
    """`images.oci` copied to basic_registry (private/busybox:1) and token_registry
    (public/busybox:1 and private/busybox:1)."""
    return copy_to_auth_registries(images, basic_registry, token_registry,
                                   tmp_path_factory.mktemp("auth-images"))
