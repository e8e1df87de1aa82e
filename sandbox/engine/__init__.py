"""The engine: images on first use, warm pools, sessions and runs (`Engine`), over the
runtime. Its modules: engine (the Engine), specs (what a caller asks to run), pool (warm
containers lent per run), sessions (containers a tenant keeps, commit), builder (Dockerfile
builds), filecache (a tenant's files by content id), runfiles (a run's files into its
container: cached ones bound, the rest copied), copyout (files a run leaves, brought
back), records (container records in the state directory, the crash sweep)."""

from sandbox.engine.builder import BuildRequest
from sandbox.engine.engine import BuildConfig, Engine, EngineConfig, PolicyLimits
from sandbox.engine.filecache import CachedFile
from sandbox.engine.pool import PoolConfig
from sandbox.engine.sessions import Session
from sandbox.engine.specs import (
    CopiedOut,
    FileSpec,
    PipelineOutcome,
    PipelineSpec,
    PipeSpec,
    ProcessSpec,
    RunOutcome,
    RunSpec,
)

__all__ = ["BuildConfig", "BuildRequest", "CachedFile", "CopiedOut", "Engine", "EngineConfig",
           "FileSpec", "PipeSpec", "PipelineOutcome", "PipelineSpec", "PolicyLimits",
           "PoolConfig", "ProcessSpec", "RunOutcome", "RunSpec", "Session"]
