"""sandboxd's engine as its users see it: `from sandbox import Engine, RunSpec, ...`.

Everything outside sandbox/ (the service above all) imports these names only, never a
module below; tests/unit/test_layering.py holds it to that.

The names load on first use (PEP 562): `python -m sandbox.runtime.spawner` imports this
package too, and the spawner (whose forks become containers' inits) must not carry the
engine, aiohttp and the image store (~290 ms and ~25 MiB more).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; `X as X` says it is re-exported
    from sandbox.configfile import Table as ConfigTable  # noqa: F401
    from sandbox.configfile import read as read_config  # noqa: F401
    from sandbox.configfile import table_of as config_table_of  # noqa: F401
    from sandbox.doctor.examine import diagnose as diagnose_host  # noqa: F401
    from sandbox.engine import BuildConfig as BuildConfig
    from sandbox.engine import BuildRequest as BuildRequest
    from sandbox.engine import CachedFile as CachedFile
    from sandbox.engine import CopiedOut as CopiedOut
    from sandbox.engine import Engine as Engine
    from sandbox.engine import EngineConfig as EngineConfig
    from sandbox.engine import FileSpec as FileSpec
    from sandbox.engine import PipelineOutcome as PipelineOutcome
    from sandbox.engine import PipelineSpec as PipelineSpec
    from sandbox.engine import PipeSpec as PipeSpec
    from sandbox.engine import PolicyLimits as PolicyLimits
    from sandbox.engine import PoolConfig as PoolConfig
    from sandbox.engine import ProcessSpec as ProcessSpec
    from sandbox.engine import RunOutcome as RunOutcome
    from sandbox.engine import RunSpec as RunSpec
    from sandbox.engine.cpuslots import TimingConfig as TimingConfig
    from sandbox.engine.filecache import FileCacheConfig as FileCacheConfig
    from sandbox.engine.pipeline import MAX_CAPTURE_BYTES as MAX_PIPELINE_CAPTURE_BYTES  # noqa: F401
    from sandbox.engine.pipeline import MAX_PROCESSES as MAX_PIPELINE_PROCESSES  # noqa: F401
    from sandbox.engine.pipeline import check as check_pipeline  # noqa: F401
    from sandbox.errors import AtQuota as AtQuota
    from sandbox.errors import AuthError as AuthError
    from sandbox.errors import BuildFailed as BuildFailed
    from sandbox.errors import Busy as Busy
    from sandbox.errors import CapacityError as CapacityError
    from sandbox.errors import CgroupError as CgroupError
    from sandbox.errors import ContainerGoneError as ContainerGoneError
    from sandbox.errors import DigestMismatch as DigestMismatch
    from sandbox.errors import Forbidden as Forbidden
    from sandbox.errors import ImageError as ImageError
    from sandbox.errors import ImageInUse as ImageInUse
    from sandbox.errors import InvalidReference as InvalidReference
    from sandbox.errors import LayerError as LayerError
    from sandbox.errors import ManifestError as ManifestError
    from sandbox.errors import NotFound as NotFound
    from sandbox.errors import PolicyError as PolicyError
    from sandbox.errors import QuotaExceeded as QuotaExceeded
    from sandbox.errors import RegistryError as RegistryError
    from sandbox.errors import RuntimeRestarting as RuntimeRestarting
    from sandbox.errors import RuntimeSetupError as RuntimeSetupError
    from sandbox.errors import SandboxError as SandboxError
    from sandbox.errors import StoreFull as StoreFull
    from sandbox.errors import WrongPlatform as WrongPlatform
    from sandbox.images import Image as Image
    from sandbox.images import Platform as Platform
    from sandbox.images import PublicNames as PublicNames
    from sandbox.images import PullProgress as PullProgress
    from sandbox.images import RegistriesConfig as RegistriesConfig
    from sandbox.images import is_digest as is_digest
    from sandbox.images.buildcontext import ContextLimits as ContextLimits
    from sandbox.images.changes import MAX_CHANGE_BYTES as MAX_CHANGE_BYTES
    from sandbox.images.changes import MAX_CHANGES as MAX_CHANGES
    from sandbox.images.reference import parse as parse_reference  # noqa: F401
    from sandbox.images.registry.hosts import is_local_address as is_local_address
    from sandbox.images.registry.hosts import is_local_ip as is_local_ip
    from sandbox.images.registry.hosts import parse_ip as parse_ip
    from sandbox.images.registry.hosts import split_host as split_host
    from sandbox.images.store.catalog import open_database as open_database
    from sandbox.images.store.catalog import transaction as sqlite_transaction  # noqa: F401
    from sandbox.kept import Kept as Kept
    from sandbox.runtime.cgroups.hostsetup import setup_host as setup_host
    from sandbox.runtime.cgroups.hostsetup import undo_host_setup as undo_host_setup
    from sandbox.runtime.cgroups.v1 import (  # noqa: F401
        KEEP_MEMORY_RESIDUE_MAX as MEMORY_PEAK_CARRY_MAX,
    )
    from sandbox.runtime.hostinfo import report as host_report  # noqa: F401
    from sandbox.runtime.network import Allowlist as Allowlist
    from sandbox.runtime.network import NetworkRequest as NetworkRequest
    from sandbox.runtime.network import Traffic as Traffic
    from sandbox.runtime.network.rules import DEFAULT_BLOCKED as DEFAULT_BLOCKED
    from sandbox.runtime.network.slirp import problem as full_network_problem  # noqa: F401
    from sandbox.runtime.output import OutputCallback as OutputCallback
    from sandbox.runtime.output import Streamed as Streamed
    from sandbox.runtime.policy import Policy as Policy
    from sandbox.runtime.profiles import Limits as Limits
    from sandbox.runtime.profiles import load_profile as load_profile
    from sandbox.runtime.pty import TtySize as TtySize
    from sandbox.runtime.results import RunResult as RunResult
    from sandbox.runtime.results import Status as Status
    from sandbox.runtime.runcontrol import ALLOWED_SIGNALS as ALLOWED_SIGNALS
    from sandbox.runtime.runcontrol import RunControl as RunControl
    from sandbox.statedir import prepare as prepare_state_dir  # noqa: F401
    from sandbox.tenants import LOCAL as LOCAL_TENANT  # noqa: F401
    from sandbox.tenants import Tenant as Tenant
    from sandbox.tenants import Turns as Turns
    from sandbox.validation import Grouped as Grouped
    from sandbox.validation import Invalid as Invalid
    from sandbox.validation import convert as convert
    from sandbox.validation import group_rules as group_rules
    from sandbox.validation import hinted as hinted
    from sandbox.validation import mismatch as mismatch

# Where each name lives at run time ("module" or "module:its name there"); the imports
# above say the same to type checkers, and tests/unit/test_layering.py that they agree.
_HOMES = {
    "ConfigTable": "sandbox.configfile:Table",
    "read_config": "sandbox.configfile:read",
    "config_table_of": "sandbox.configfile:table_of",
    "DEFAULT_BLOCKED": "sandbox.runtime.network.rules",
    "Grouped": "sandbox.validation",
    "Invalid": "sandbox.validation",
    "convert": "sandbox.validation",
    "group_rules": "sandbox.validation",
    "hinted": "sandbox.validation",
    "mismatch": "sandbox.validation",
    "ALLOWED_SIGNALS": "sandbox.runtime.runcontrol",
    "Allowlist": "sandbox.runtime.network",
    "AtQuota": "sandbox.errors",
    "AuthError": "sandbox.errors",
    "BuildConfig": "sandbox.engine",
    "BuildFailed": "sandbox.errors",
    "BuildRequest": "sandbox.engine",
    "Busy": "sandbox.errors",
    "CachedFile": "sandbox.engine",
    "CapacityError": "sandbox.errors",
    "CgroupError": "sandbox.errors",
    "ContainerGoneError": "sandbox.errors",
    "CopiedOut": "sandbox.engine",
    "ContextLimits": "sandbox.images.buildcontext",
    "DigestMismatch": "sandbox.errors",
    "Engine": "sandbox.engine",
    "EngineConfig": "sandbox.engine",
    "FileCacheConfig": "sandbox.engine.filecache",
    "FileSpec": "sandbox.engine",
    "Forbidden": "sandbox.errors",
    "Image": "sandbox.images",
    "ImageError": "sandbox.errors",
    "ImageInUse": "sandbox.errors",
    "InvalidReference": "sandbox.errors",
    "Kept": "sandbox.kept",
    "LOCAL_TENANT": "sandbox.tenants:LOCAL",
    "MAX_CHANGES": "sandbox.images.changes",
    "MEMORY_PEAK_CARRY_MAX": "sandbox.runtime.cgroups.v1:KEEP_MEMORY_RESIDUE_MAX",
    "MAX_PIPELINE_CAPTURE_BYTES": "sandbox.engine.pipeline:MAX_CAPTURE_BYTES",
    "MAX_PIPELINE_PROCESSES": "sandbox.engine.pipeline:MAX_PROCESSES",
    "MAX_CHANGE_BYTES": "sandbox.images.changes",
    "LayerError": "sandbox.errors",
    "Limits": "sandbox.runtime.profiles",
    "ManifestError": "sandbox.errors",
    "NetworkRequest": "sandbox.runtime.network",
    "NotFound": "sandbox.errors",
    "OutputCallback": "sandbox.runtime.output",
    "PipeSpec": "sandbox.engine",
    "PipelineOutcome": "sandbox.engine",
    "PipelineSpec": "sandbox.engine",
    "Platform": "sandbox.images",
    "Policy": "sandbox.runtime.policy",
    "PolicyError": "sandbox.errors",
    "PolicyLimits": "sandbox.engine",
    "PoolConfig": "sandbox.engine",
    "ProcessSpec": "sandbox.engine",
    "PublicNames": "sandbox.images",
    "PullProgress": "sandbox.images",
    "QuotaExceeded": "sandbox.errors",
    "RegistriesConfig": "sandbox.images",
    "RegistryError": "sandbox.errors",
    "RunControl": "sandbox.runtime.runcontrol",
    "RunResult": "sandbox.runtime.results",
    "RunOutcome": "sandbox.engine",
    "RunSpec": "sandbox.engine",
    "RuntimeRestarting": "sandbox.errors",
    "RuntimeSetupError": "sandbox.errors",
    "SandboxError": "sandbox.errors",
    "Status": "sandbox.runtime.results",
    "StoreFull": "sandbox.errors",
    "Streamed": "sandbox.runtime.output",
    "Tenant": "sandbox.tenants",
    "TtySize": "sandbox.runtime.pty",
    "Traffic": "sandbox.runtime.network",
    "Turns": "sandbox.tenants",
    "TimingConfig": "sandbox.engine.cpuslots",
    "WrongPlatform": "sandbox.errors",
    "check_pipeline": "sandbox.engine.pipeline:check",
    "diagnose_host": "sandbox.doctor.examine:diagnose",
    "full_network_problem": "sandbox.runtime.network.slirp:problem",
    "host_report": "sandbox.runtime.hostinfo:report",
    "is_digest": "sandbox.images",
    "is_local_address": "sandbox.images.registry.hosts",
    "is_local_ip": "sandbox.images.registry.hosts",
    "load_profile": "sandbox.runtime.profiles",
    "parse_ip": "sandbox.images.registry.hosts",
    "open_database": "sandbox.images.store.catalog",
    "parse_reference": "sandbox.images.reference:parse",
    "prepare_state_dir": "sandbox.statedir:prepare",
    "setup_host": "sandbox.runtime.cgroups.hostsetup",
    "sqlite_transaction": "sandbox.images.store.catalog:transaction",
    "split_host": "sandbox.images.registry.hosts",
    "undo_host_setup": "sandbox.runtime.cgroups.hostsetup",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    try:
        module, _, attr = _HOMES[name].partition(":")
    except KeyError:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
