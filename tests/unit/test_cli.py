"""The `sandboxd` command line."""

from __future__ import annotations

import json
import os

import pytest

from service.cli import main


def test_info_prints_the_host_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"user_namespaces", "id_mapping", "cgroup", "seccomp", "warnings"} <= set(report)


def test_setup_refuses_what_it_cannot_do(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        assert main(["setup"]) == 2
        assert "run it as root" in capsys.readouterr().err
    else:
        assert main(["setup", "--remove"]) == 2
        assert "name it with --user" in capsys.readouterr().err


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
