"""The engine: images on first use, warm pools, sessions and runs (`Engine`), over the
runtime. Its modules: engine (the Engine and its request types), pool (warm containers
lent per run), records (container records in the state directory, the crash sweep)."""

from sandbox.engine.engine import (
    Engine,
    EngineConfig,
    FileSpec,
    PolicyLimits,
    RunOutcome,
    RunSpec,
    Session,
)
from sandbox.engine.pool import PoolConfig

__all__ = ["Engine", "EngineConfig", "FileSpec", "PolicyLimits", "PoolConfig", "RunOutcome",
           "RunSpec", "Session"]
