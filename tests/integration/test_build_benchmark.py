"""The image benchmark runs end to end (--quick): its own registry and sandboxd serve. No
speed is checked: only that each figure is there, positive, and beside its baselines."""

from __future__ import annotations

import os

from tests.support.benchmarks import quick_run


def test_quick_run_prints_the_commit_and_build_figures_beside_their_baselines() -> None:
    lines, fig = quick_run("loadtest.build")
    assert fig["commits"] == 2 and fig["files"] == 20
    assert fig["commit_min_ms"] <= fig["commit_median_ms"] <= fig["commit_max_ms"]
    for key in ("commit_median_ms", "bare_tar_median_ms", "bare_tar_gzip1_median_ms",
                "bare_tar_gzip6_median_ms"):
        assert fig[key] > 0, key
    row = next(line for line in lines if line.startswith("commit of a session"))
    assert "tar " in row and "tar|gzip -1" in row and "tar|gzip -6" in row and "x)" in row
    assert fig["builds"] == 2
    for key in ("build_median_ms", "rebuild_median_ms", "bare_steps_median_ms"):
        assert fig[key] > 0, key
    assert fig["build_peak_big_bytes"] >= 0 and fig["big_layer_bytes"] == 16 << 20
    row = next(line for line in lines if line.startswith("build of the five-step"))
    assert "bare steps " in row
    if os.geteuid() == 0:  # buildah beside it (rootless buildah needs id maps of its own)
        assert fig["buildah_build_median_ms"] > 0 and fig["buildah_rebuild_median_ms"] > 0
        assert "buildah --no-cache " in row
    else:
        assert "root only" in fig["buildah"]
