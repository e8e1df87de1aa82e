"""Compile the security probes (one static C program per probes/*.c).

    python tests/security/probes/build.py OUT_DIR [CC]

builds every probe into OUT_DIR and prints the paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROBES_DIR = Path(__file__).resolve().parent


def probe_sources() -> list[Path]:
    """Every probe source, sorted by name."""
    return sorted(PROBES_DIR.glob("*.c"))


def _compile(cc: str, src: Path, out: Path) -> Path:
    text = src.read_text()
    extra = ["-pthread"] if "pthread" in text else []
    cmd = [cc, "-static", "-O1", "-Wall", *extra, "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"compiling probe {src.name} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr}"
        )
    return out


def build_probes(out_dir: Path, *, cc: str = "gcc") -> dict[str, Path]:
    """Compile every probes/*.c statically into out_dir/<stem>; return {stem: path}.

    Raises RuntimeError carrying the compiler's stderr when a probe does not compile.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = probe_sources()
    workers = max(1, min(4, os.cpu_count() or 1, len(sources)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {src.stem: pool.submit(_compile, cc, src, out_dir / src.stem) for src in sources}
        return {stem: future.result() for stem, future in futures.items()}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    built = build_probes(Path(argv[1]), cc=argv[2] if len(argv) == 3 else "gcc")
    for stem, path in built.items():
        print(f"{stem}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
