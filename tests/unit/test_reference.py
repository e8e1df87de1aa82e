"""Reference parsing against cases re-expressed from distribution/reference's own tests
(normalize_test.go, reference_test.go, regexp_test.go), plus our hostile-input cases."""

from __future__ import annotations

import pytest

from sandbox.errors import InvalidReference
from sandbox.images.reference import Reference, parse

D1 = "sha256:" + "f" * 64
D2 = "sha256:be178c0543eb17f5f3043021c9e5fcf30285e557a4fc309cce97ff9ca6182912"


# text -> (domain, path, tag, digest)
PARSED = {
    # familiar Docker Hub names
    "python": ("docker.io", "library/python", "latest", None),
    "python:3.12-slim": ("docker.io", "library/python", "3.12-slim", None),
    "docker.io/python": ("docker.io", "library/python", "latest", None),
    "docker.io/library/python:3": ("docker.io", "library/python", "3", None),
    "index.docker.io/python": ("docker.io", "library/python", "latest", None),
    "index.docker.io/library/debian": ("docker.io", "library/debian", "latest", None),
    "index.docker.io/docker/docker": ("docker.io", "docker/docker", "latest", None),
    "docker/docker": ("docker.io", "docker/docker", "latest", None),
    "library/debian": ("docker.io", "library/debian", "latest", None),
    "library/foo/bar": ("docker.io", "library/foo/bar", "latest", None),
    "store/foo/bar": ("docker.io", "store/foo/bar", "latest", None),
    "other/library": ("docker.io", "other/library", "latest", None),
    "test_com": ("docker.io", "library/test_com", "latest", None),
    "ubuntu-12.04-base": ("docker.io", "library/ubuntu-12.04-base", "latest", None),
    # a single component is a Hub name even when it looks like a host (Docker's FIXME)
    "test.com:tag": ("docker.io", "library/test.com", "tag", None),
    "test.com:5000": ("docker.io", "library/test.com", "5000", None),
    "localhost:5000": ("docker.io", "library/localhost", "5000", None),
    "192.168.1.1": ("docker.io", "library/192.168.1.1", "latest", None),
    "192.168.0.1:80": ("docker.io", "library/192.168.0.1", "80", None),
    "foo_bar.com:8080": ("docker.io", "library/foo_bar.com", "8080", None),
    "localhost@" + D2: ("docker.io", "library/localhost", None, D2),
    # a first component that is not a host stays in the path
    "foo/foo_bar.com:8080": ("docker.io", "foo/foo_bar.com", "8080", None),
    "docker.io/" + "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a":
        ("docker.io", "library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
         "latest", None),
    # separators
    "docker-rules/docker": ("docker.io", "docker-rules/docker", "latest", None),
    "docker---rules/docker": ("docker.io", "docker---rules/docker", "latest", None),
    "dock__er/docker": ("docker.io", "dock__er/docker", "latest", None),
    "d/docker": ("docker.io", "d/docker", "latest", None),
    "jess/t": ("docker.io", "jess/t", "latest", None),
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev":
        ("docker.io", "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
         "latest", None),
    # localhost, hosts with dots or ports, uppercase first component
    "localhost/fooo": ("localhost", "fooo", "latest", None),
    "localhost/fooo/bar": ("localhost", "fooo/bar", "latest", None),
    "localhost:8080/name@" + D2: ("localhost:8080", "name", None, D2),
    "LOCALDOMAIN/fooo": ("LOCALDOMAIN", "fooo", "latest", None),
    "Docker/docker": ("Docker", "docker", "latest", None),
    "DOCKER/docker": ("DOCKER", "docker", "latest", None),
    "Asdf.com/foo/bar": ("Asdf.com", "foo/bar", "latest", None),
    "test.com/repo:tag": ("test.com", "repo", "tag", None),
    "test:5000/repo": ("test:5000", "repo", "latest", None),
    "test:5000/repo:tag": ("test:5000", "repo", "tag", None),
    "test:5000/repo@" + D1: ("test:5000", "repo", None, D1),
    "127.0.0.1:5000/debian": ("127.0.0.1:5000", "debian", "latest", None),
    "127.0.0.1:8000/private/moonbase": ("127.0.0.1:8000", "private/moonbase", "latest", None),
    "192.168.1.1/repo": ("192.168.1.1", "repo", "latest", None),
    "192.168.1.1:5000/repo:5050": ("192.168.1.1:5000", "repo", "5050", None),
    "192.168.0.1:8/debian": ("192.168.0.1:8", "debian", "latest", None),
    "example.com:8000/privatebasee": ("example.com:8000", "privatebasee", "latest", None),
    "ghcr.io/org/judge": ("ghcr.io", "org/judge", "latest", None),
    "sub-dom1.foo.com/bar/baz/quux:some-long-tag":
        ("sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None),
    "b.gcr.io/test.example.com/my-app:test.example.com":
        ("b.gcr.io", "test.example.com/my-app", "test.example.com", None),
    "xn--n3h.com/myimage:xn--n3h.com": ("xn--n3h.com", "myimage", "xn--n3h.com", None),
    "registry.io/foo/project--id.module--name.ver---sion--name":
        ("registry.io", "foo/project--id.module--name.ver---sion--name", "latest", None),
    "example.com/some_separator__underscore/myimage":
        ("example.com", "some_separator__underscore/myimage", "latest", None),
    "lowercase:Uppercase": ("docker.io", "library/lowercase", "Uppercase", None),
    # IPv6 in brackets
    "[2001:db8::1]/repo": ("[2001:db8::1]", "repo", "latest", None),
    "[2001:db8:1:2:3:4:5:6]/repo:tag": ("[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    "[2001:db8::1]:5000/repo@" + D1: ("[2001:db8::1]:5000", "repo", None, D1),
    "[2001:db8::]:5000/repo": ("[2001:db8::]:5000", "repo", "latest", None),
    "[::1]:5000/repo": ("[::1]:5000", "repo", "latest", None),
    "[fc00:1:2:3:4:5:6:7]:5000/library/debian":
        ("[fc00:1:2:3:4:5:6:7]:5000", "library/debian", "latest", None),
    # tag plus digest: ParseDockerRef keeps the digest only
    "busybox:latest@" + D2: ("docker.io", "library/busybox", None, D2),
    "test:5000/repo:tag@" + D1: ("test:5000", "repo", None, D1),
    "[2001:db8::1]:5000/repo:tag@" + D1: ("[2001:db8::1]:5000", "repo", None, D1),
    "xn--7o8h.com/myimage:xn--7o8h.com@" + D1: ("xn--7o8h.com", "myimage", None, D1),
    # tags: 128 characters, word characters
    "a:" + "t" * 128: ("docker.io", "library/a", "t" * 128, None),
    "a:_x.Y-9": ("docker.io", "library/a", "_x.Y-9", None),
    # Docker caps the path, not the domain, at 255
    "example.com/" + "a" * 255 + ":tag": ("example.com", "a" * 255, "tag", None),
    "a/" * 127 + "a:tag-puts-this-over-max":
        ("docker.io", "a/" * 127 + "a", "tag-puts-this-over-max", None),
    # a 64-hex string with a tag is a name (only the bare string is refused)
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a:v1":
        ("docker.io", "library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
         "v1", None),
}


@pytest.mark.parametrize(("text", "expected"), PARSED.items(), ids=[t[:60] for t in PARSED])
def test_parse_normalises_like_docker(text: str, expected: tuple) -> None:
    ref = parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == expected
    # the normalised form is a fixed point
    assert parse(str(ref)) == ref


# text -> a fragment the message must contain
INVALID = {
    "": "empty",
    " python": "' '",
    "python ": "' '",
    "py\tthon": "'\\t'",
    "python\n": "'\\n'",
    "a\x00b": "'\\x00'",
    "a\x7fb": "'\\x7f'",
    "pythön": "non-ASCII",
    "python@": "'@' must be followed by a digest",
    "python:": "':' must be followed by a tag",
    "example.com/app:": "':' must be followed by a tag",
    "a/": "ends with '/'",
    "docker/": "ends with '/'",
    "foo.com/": "ends with '/'",
    "docker///docker": "empty path component",
    "docker.io/docker///docker": "empty path component",
    "a//a/a": "empty path component",
    "docker/Docker": "must be lowercase",
    "docker.io/docker/Docker": "must be lowercase",
    "Uppercase:tag": "must be lowercase",
    "test:5000/Uppercase/lowercase:tag": "must be lowercase",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a": "image ID",
    ":justtag": "repository name is missing",
    "@" + D1: "repository name is missing",
    "-docker": "'-docker'",
    "-docker/docker": "'-docker'",
    "docker-/docker": "'docker-'",
    "-docker-/docker": "'-docker-'",
    "____/____": "'____'",
    "_docker/_docker": "'_docker'",
    "dock..er/docker": "'dock..er'",
    "dock_.er/docker": "'dock_.er'",
    "dock-.er/docker": "'dock-.er'",
    "example.com/__underscore/myimage": "'__underscore'",
    "example.com/.dots/myimage": "'.dots'",
    "aa/asdf$$^/aa": "'asdf$$^'",
    "a^a": "'a^a'",
    "-docker.io/docker/docker": "not a registry host name",
    "bad_hostname.com:8080/myapp:tag": "not a registry host name",
    "do__cker:8080/docker": "not a registry host name",
    "foo.com:http/bar": "must be a number",
    "https://github.com/docker/docker": "URL scheme",
    "[fc00::1]": "followed by '/'",
    "[fc00::1]:5000": "followed by '/'",
    "[2001:db8::1]:tag": "followed by '/'",
    "fc00::1:5000/debian": "brackets",
    "[fe80::1%eth0]:5000/debian": "zone",
    "[fe80::1%@invalidzone]:5000/repo": "zone",
    "[2001:db8:3:4::192.0.2.33]:5000/debian": "brackets",
    "a:-tag": "not a valid tag",
    "a:.tag": "not a valid tag",
    "a:ta~g": "not a valid tag",
    "registry.com:8080/myapp:invalid~tag": "not a valid tag",
    "a:" + "t" * 129: "at most 128",
    "domain/" + "a" * 256 + ":tag": "at most 255",
    "this_is_not_a_valid_namespace_" + "x" * 230 + "/docker": "at most 255",
    "example.com/" + "a" * 256: "at most 255",
    "x" * 300 + ".com/a": "longer than 255",
    "a" * 2000: "more than any valid reference",
    "repo@sha256:ffffffffffffffffffffffffffffffffff": "not a digest",
    "repo@sha256:" + "F" * 64: "not a digest",
    "validname@invaliddigest:" + "f" * 64: "only sha256",
    "validname@sha512:" + "f" * 128: "only sha256",
    "registry.com:8080/myapp@bad": "not a digest",
    "registry.com:8080/myapp@2bad": "not a digest",
    "a@" + D1 + "@" + D1: "more than one '@'",
}


@pytest.mark.parametrize(("text", "fragment"), INVALID.items(), ids=[t[:60] for t in INVALID])
def test_parse_rejects_with_a_message_saying_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse(text)
    assert fragment in str(info.value)
    assert len(str(info.value)) < 1000  # hostile input is not echoed in full


def test_grammar_errors_show_a_valid_example() -> None:
    with pytest.raises(InvalidReference, match=r"python:3\.12-slim"):
        parse("docker///docker")


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidReference, match="must be a string"):
        parse(b"python")  # type: ignore[arg-type]


# normalised full form -> familiar form (normalize_test.go's TestParseRepositoryInfo)
FAMILIAR = {
    "localhost/fooo": "localhost/fooo:latest",
    "LOCALDOMAIN/fooo/bar": "LOCALDOMAIN/fooo/bar:latest",
    "docker.io/fooo/bar": "fooo/bar:latest",
    "index.docker.io/fooo/bar": "fooo/bar:latest",
    "docker.io/library/ubuntu": "ubuntu:latest",
    "library/ubuntu:22.04": "ubuntu:22.04",
    "docker.io/foo": "foo:latest",
    "docker.io/nonlibrary/ubuntu": "nonlibrary/ubuntu:latest",
    "docker.io/library/foo/bar": "library/foo/bar:latest",
    "127.0.0.1:8000/privatebase": "127.0.0.1:8000/privatebase:latest",
    "example.com:8000/private/moonbase": "example.com:8000/private/moonbase:latest",
    "Foo/bar": "Foo/bar:latest",
    "python@" + D1: "python@" + D1,
    "ghcr.io/org/judge@" + D1: "ghcr.io/org/judge@" + D1,
}


@pytest.mark.parametrize(("text", "familiar"), FAMILIAR.items())
def test_familiar_form(text: str, familiar: str) -> None:
    assert parse(text).familiar() == familiar


def test_properties() -> None:
    hub = parse("python:3.12")
    assert str(hub) == "docker.io/library/python:3.12"
    assert hub.repository == "docker.io/library/python"
    assert hub.api_host == "registry-1.docker.io"
    assert hub.identifier == "3.12"
    local = parse("localhost:5000/a/b@" + D1)
    assert str(local) == "localhost:5000/a/b@" + D1
    assert local.api_host == "localhost:5000"
    assert local.identifier == D1
    assert parse("[::1]:5000/x").api_host == "[::1]:5000"
    assert Reference("ghcr.io", "org/x").identifier == "latest"


def test_with_digest_and_with_tag_keep_one_identifier() -> None:
    ref = parse("ghcr.io/org/judge:1.0")
    pinned = ref.with_digest(D1)
    assert (pinned.tag, pinned.digest) == (None, D1)
    assert str(pinned) == "ghcr.io/org/judge@" + D1
    retagged = pinned.with_tag("2.0")
    assert (retagged.tag, retagged.digest) == ("2.0", None)
    assert str(retagged) == "ghcr.io/org/judge:2.0"
    with pytest.raises(InvalidReference, match="not a tag"):
        ref.with_tag("bad tag")
    with pytest.raises(InvalidReference, match="only sha256"):
        ref.with_digest("sha512:" + "f" * 128)
    with pytest.raises(InvalidReference, match="not a digest"):
        ref.with_digest("../../etc/passwd")


@pytest.mark.parametrize(("domain", "path"), [
    ("docker.io", "python"),              # not normalised: library/ is missing
    ("index.docker.io", "library/python"),  # not normalised: legacy host
    ("bad host", "a"),
    ("example.com", "A/b"),
    ("example.com", "a//b"),
    ("example.com", ""),
])
def test_constructor_refuses_malformed_or_unnormalised(domain: str, path: str) -> None:
    with pytest.raises(InvalidReference):
        Reference(domain, path)


def test_references_are_hashable_values() -> None:
    assert parse("python") == parse("docker.io/library/python:latest")
    assert len({parse("python"), parse("index.docker.io/library/python")}) == 1
