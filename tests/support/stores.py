"""The stores of a service's state directory, checked (after a fault, once it stopped)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sandbox.engine.filecache import FileCache
from sandbox.images import ImageService


def state_problems(state: Path) -> list[str]:
    """What is wrong with the image store and the file cache under `state` (empty: both
    consistent); reads every blob."""

    async def check() -> list[str]:
        async with ImageService(state) as store:
            problems = await asyncio.to_thread(store.verify)
        cache = FileCache(state / "files")
        try:
            return problems + cache.verify()
        finally:
            cache.close()

    return asyncio.run(check())
