"""Pure pieces of the transport: Retry-After, error bodies, Content-Range, manifest typing."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from sandbox.errors import ManifestError
from sandbox.registry.client import MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST, check_manifest
from sandbox.registry.download import range_matches
from sandbox.registry.transport import describe_error, parse_retry_after

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7.0), (" 0 ", 0.0), ("Thu, 01 Jan 2026 12:00:09 GMT", 9.0),
    ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0), ("soon", None), ("", None), (None, None),
    ("-5", None),
])
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_error_bodies() -> None:
    body = orjson.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                     "detail": {"Tag": "x"}},
                                    {"code": "DENIED", "message": "no\nnewlines"}]})
    assert describe_error(404, "Not Found", "application/json", body) == (
        "404 MANIFEST_UNKNOWN: manifest unknown; DENIED: no newlines", "MANIFEST_UNKNOWN")
    message, code = describe_error(429, "Too Many Requests", "text/html",
                                   b"<html><body>" + b"x" * 10000)
    assert message == "429 Too Many Requests (an HTML page)" and code is None
    message, _ = describe_error(500, None, "text/plain", b"\x00" + b"y" * 5000)
    assert message.startswith("500: ") and len(message) < 300 and "\x00" not in message
    assert describe_error(502, "Bad Gateway", "", b"") == ("502 Bad Gateway", None)
    assert describe_error(400, None, "", b'{"errors": [1, {"code": 5}]}')[0].startswith("400")


@pytest.mark.parametrize(("header", "offset", "size", "ok"), [
    ("bytes 100-999/1000", 100, 1000, True),
    ("bytes 100-999/*", 100, 1000, True),
    ("bytes 100-999/1000", 100, None, True),
    ("bytes 0-999/1000", 100, 1000, False),
    ("bytes 100-998/1000", 100, 1000, False),
    ("bytes 100-999/1001", 100, 1000, False),
    ("bytes 100-99/1000", 100, 1000, False),
    ("bytes */1000", 100, 1000, False),
    (None, 100, 1000, False),
])
def test_content_range(header: str | None, offset: int, size: int | None, ok: bool) -> None:
    assert range_matches(header, offset, size) is ok


def manifest(media_type: str | None) -> bytes:
    data: dict = {"schemaVersion": 2, "layers": []}
    if media_type:
        data["mediaType"] = media_type
    return orjson.dumps(data)


def test_manifest_media_type_rules() -> None:
    ok = check_manifest(f"{OCI_MANIFEST}; charset=utf-8", manifest(OCI_MANIFEST),
                        MANIFEST_ACCEPT, "m")
    assert ok == OCI_MANIFEST
    assert check_manifest(OCI_MANIFEST, manifest(None), MANIFEST_ACCEPT, "m") == OCI_MANIFEST
    assert check_manifest("application/json", manifest(OCI_INDEX), MANIFEST_ACCEPT,
                          "m") == OCI_INDEX
    with pytest.raises(ManifestError, match="ambiguous"):  # CVE-2021-41190
        check_manifest(OCI_MANIFEST, manifest(OCI_INDEX), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="schema 1"):
        check_manifest("application/vnd.docker.distribution.manifest.v1+prettyjws",
                       manifest(None), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not one of"):
        check_manifest(OCI_INDEX, manifest(None), [OCI_MANIFEST], "m")
    with pytest.raises(ManifestError, match="no media type"):
        check_manifest(None, manifest(None), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not JSON"):
        check_manifest(OCI_MANIFEST, b"\xff{", MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not a JSON object"):
        check_manifest(OCI_MANIFEST, b"[1]", MANIFEST_ACCEPT, "m")
