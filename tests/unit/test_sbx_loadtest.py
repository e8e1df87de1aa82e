"""`sbx loadtest`: the load test's own options, with sbx's service and token passed on."""

from __future__ import annotations

import pytest

import loadtest.__main__ as loadtest_main
from sbx import cli


@pytest.fixture
def given(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake(argv: list[str] | None = None) -> int:
        calls.append(list(argv or []))
        return 7

    monkeypatch.setattr(loadtest_main, "main", fake)
    monkeypatch.delenv("SANDBOXD_URL", raising=False)
    monkeypatch.delenv("SANDBOXD_TOKEN", raising=False)
    return calls


def test_options_pass_through_with_sbx_service_and_token(given: list[list[str]]) -> None:
    assert cli.main(["--url", "http://127.0.0.1:9999", "--token", "t0k", "loadtest",
                     "--workload", "cpu,io", "--rate", "50", "--image", "x/busybox:1"]) == 7
    assert given == [["--workload", "cpu,io", "--rate", "50", "--image", "x/busybox:1",
                      "--url", "http://127.0.0.1:9999", "--token", "t0k"]]


def test_the_default_service_unless_spawning(given: list[list[str]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cli.main(["loadtest", "--image", "x/busybox:1"])
    monkeypatch.setenv("SANDBOXD_URL", "http://127.0.0.1:8700")
    cli.main(["loadtest", "--", "--image", "x/busybox:1"])
    cli.main(["loadtest", "--spawn"])
    assert given == [["--image", "x/busybox:1", "--url", cli.DEFAULT_URL],
                     ["--image", "x/busybox:1", "--url", "http://127.0.0.1:8700"],
                     ["--spawn"]]


def test_other_commands_still_refuse_unknown_options(given: list[list[str]]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["info", "--workload", "true"])
    assert given == []
