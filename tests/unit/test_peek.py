"""Reading an image's own files (for its User) from its layers, never from the host."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.images.store.peek import read_from_layers


def _layers(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        (tmp_path / f"l{i}" / "etc").mkdir(parents=True)
        out.append(tmp_path / f"l{i}")
    return out


def test_the_topmost_layer_wins(tmp_path: Path) -> None:
    low, high = _layers(tmp_path, 2)
    (low / "etc/passwd").write_text("low")
    assert read_from_layers([low, high], "/etc/passwd", 100) == b"low"
    (high / "etc/passwd").write_text("high")
    assert read_from_layers([low, high], "/etc/passwd", 100) == b"high"
    assert read_from_layers([low, high], "/etc/passwd", 2) == b"hi"


def test_a_whiteout_hides_the_lower_file(tmp_path: Path) -> None:
    low, high = _layers(tmp_path, 2)
    (low / "etc/passwd").write_text("low")
    os.mknod(high / "etc/passwd", 0o600 | 0o020000, os.makedev(0, 0))
    assert read_from_layers([low, high], "/etc/passwd", 100) is None


def test_a_symlink_never_leads_to_the_host(tmp_path: Path) -> None:
    (layer,) = _layers(tmp_path, 1)
    canary = tmp_path / "host-secret"
    canary.write_text("secret")
    (layer / "etc/passwd").symlink_to("../../../../../../../../" + str(canary))
    (layer / "etc/group").symlink_to(str(canary))
    assert read_from_layers([layer], "/etc/passwd", 100) is None
    assert read_from_layers([layer], "/etc/group", 100) is None


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    (layer,) = _layers(tmp_path, 1)
    os.mkfifo(layer / "etc/passwd")
    (layer / "etc/group").mkdir()
    assert read_from_layers([layer], "/etc/passwd", 100) is None  # would block if opened
    assert read_from_layers([layer], "/etc/group", 100) is None
    assert read_from_layers([layer], "/etc/missing/x", 100) is None
