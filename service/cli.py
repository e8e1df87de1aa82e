"""`sandboxd`: the engine's command line.

    sandboxd setup [--user NAME [--remove]] as root, once: cgroup tuning, delegation to NAME
    sandboxd info                           what this host can enforce, as JSON
    sandboxd doctor [--state-dir D] [--json]  what this host lacks, each problem's fix
    sandboxd serve --state-dir D [--host H] [--port P] [--config FILE]   the REST API
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from aiohttp.http_exceptions import HttpProcessingError

from sandbox import SandboxError


def _setup(args: argparse.Namespace) -> int:
    from sandbox import setup_host, undo_host_setup

    if os.geteuid() != 0:
        print("sandboxd setup changes cgroup mounts and ownership: run it as root",
              file=sys.stderr)
        return 2
    if args.remove and not args.user:
        print("--remove undoes a delegation: name it with --user", file=sys.stderr)
        return 2
    for line in undo_host_setup(args.user) if args.remove else setup_host(args.user):
        print(line)
    return 0


def _info(_: argparse.Namespace) -> int:
    from sandbox import host_report

    print(json.dumps(host_report(), indent=2))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from sandbox import diagnose_host

    state_dir = args.state_dir or os.environ.get("SANDBOXD_STATE_DIR")
    if args.config:
        from service.config import load

        state_dir = load(Path(args.config), overrides={"state_dir": state_dir}).state_dir
    report = diagnose_host(Path(state_dir) if state_dir else None)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return report.exit_status


def _serve(args: argparse.Namespace) -> int:
    from service.app import serve
    from service.config import load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    config = load(Path(args.config) if args.config else None,
                  overrides={"host": args.host, "port": args.port, "state_dir": args.state_dir})
    config.check_bind()
    # aiohttp logs a request its parser refuses (a request line over 8 KiB, say) with a
    # traceback, before any handler or middleware can answer: one line says it all.
    logging.getLogger("aiohttp.server").addFilter(_one_line_parser_errors)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        uvloop = None  # outside the except block: errors logged later must not chain to it
    if uvloop is None:
        return asyncio.run(serve(config))
    return int(uvloop.run(serve(config)))


def _one_line_parser_errors(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args = "refused a malformed request: %s", (exc,)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandboxd", description="rootless sandbox engine")
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="as root: tune cgroups, delegate a subtree to a user")
    setup.add_argument("--user", help="the ordinary user the service will run as")
    setup.add_argument("--remove", action="store_true", help="undo the delegation")
    setup.set_defaults(func=_setup)
    sub.add_parser("info", help="print what this host can enforce").set_defaults(func=_info)
    doctor = sub.add_parser("doctor", help="check this host or pod for sandboxd; exit status "
                            "1 when something blocks runs")
    doctor.add_argument("--state-dir", help="the state directory to check (space, owner)")
    doctor.add_argument("--config", help="take the state directory from this TOML file")
    doctor.add_argument("--json", action="store_true", help="one JSON document")
    doctor.set_defaults(func=_doctor)
    serve = sub.add_parser("serve", help="serve the REST API")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8643; 0 picks a free one)")
    serve.add_argument("--state-dir", help="images, records and temporary files")
    serve.add_argument("--config", help="a TOML file (see service/config.py)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SandboxError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
