"""The client side of sandboxd: `Client` (asyncio) and `SyncClient` over its REST API, and
the `sbx` command line (sbx/cli.py). It talks HTTP only: nothing here imports the service
or the sandbox, so it installs and runs wherever the service can be reached."""

from sbx.client import (
    DEFAULT_URL,
    ApiError,
    Client,
    Exit,
    File,
    FileData,
    Interactive,
    Output,
    Pulled,
    PullProgress,
    RunEvent,
    RunOptions,
    RunResult,
    SyncClient,
)

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "Client",
    "Exit",
    "File",
    "FileData",
    "Interactive",
    "Output",
    "PullProgress",
    "Pulled",
    "RunEvent",
    "RunOptions",
    "RunResult",
    "SyncClient",
]
