"""`sandboxd`: the engine's command line.

    sandboxd setup [--user NAME [--systemd | --user-unit] [--remove]]
                                            as root, once: cgroup tuning, delegation to NAME,
                                            a systemd service run as NAME
    sandboxd info                           what this host can enforce, as JSON
    sandboxd doctor [--state-dir D] [--json]  what this host lacks, each problem's fix
    sandboxd serve --state-dir D [--host H] [--port P] [--config FILE] [--log-format json]
                                            the REST API
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path

from aiohttp.http_exceptions import HttpProcessingError

from sandbox import SandboxError


def _setup(args: argparse.Namespace) -> int:
    from sandbox import setup_host, undo_host_setup
    from service import systemd

    if os.geteuid() != 0:
        print("sandboxd setup changes cgroup mounts and ownership: run it as root",
              file=sys.stderr)
        return 2
    if args.remove and not args.user:
        print("--remove undoes a delegation: name it with --user", file=sys.stderr)
        return 2
    unit = args.systemd or args.user_unit
    if unit and not args.user:
        print("--systemd runs sandboxd as an ordinary user: name it with --user",
              file=sys.stderr)
        return 2
    layout = None
    if unit:
        layout = (systemd.user_layout if args.user_unit else systemd.system_layout)(args.user)
    steps: Iterable[str]
    if args.remove:
        # The service first: it runs in the delegated cgroups.
        steps = itertools.chain(systemd.remove(layout) if layout is not None else (),
                                undo_host_setup(args.user))
    elif layout is None:
        steps = setup_host(args.user)
    else:
        steps = itertools.chain(setup_host(args.user),
                                systemd.install(layout, systemd.executable()),
                                systemd.start(layout))
    for line in steps:  # each as it is done: a step that fails shows where it stopped
        print(line, flush=True)
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
    from service import logs
    from service.app import serve
    from service.config import load

    config = load(Path(args.config) if args.config else None,
                  overrides={"host": args.host, "port": args.port, "state_dir": args.state_dir})
    if args.log_format is not None:
        config = dataclasses.replace(config, log_format=args.log_format)
    logs.configure(config.log_format)
    config.check_bind()
    _raise_open_files_limit()
    # aiohttp logs a request its parser refuses (a request line over 8 KiB, say) with a
    # traceback, before any handler or middleware can answer: one line says it all.
    logging.getLogger("aiohttp.server").addFilter(_one_line_parser_errors)
    # asyncio's own loop, not uvloop: measured against it (warm runs, 1 and 8 clients),
    # uvloop made no run cheaper in CPU or time and each ~15 system calls dearer (libuv's
    # poll handle for each add_reader of a run's output pipes: a FIONBIO and four more
    # epoll_ctl per pipe).
    return asyncio.run(serve(config))


# Where the hard limit is unlimited (not Linux's way: nr_open caps it), what is asked.
_OPEN_FILES_CAP = 1 << 20


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one, as dockerd and Go programs do. Each
    warm container keeps a dozen descriptors in the service (its control socket, its
    cgroups' files): under Debian's soft limit of 1024 (a shell's and a systemd unit's) the
    service could hold only some 70 before every new container failed. Runs are not given
    it: each gets its policy's `open_files`."""
    log = logging.getLogger("sandboxd.service")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warning("open files: cannot raise the soft limit from %d to %d (%s), so "
                        "fewer warm containers fit: raise it (ulimit -n, or LimitNOFILE= in "
                        "a systemd unit)", soft, wanted, e)


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
    setup.add_argument("--remove", action="store_true", help="undo the delegation (and with "
                       "--systemd, the unit and the files it wrote)")
    setup.add_argument("--systemd", action="store_true",
                       help="also run sandboxd as a systemd service as --user: writes "
                       "/etc/systemd/system/sandboxd.service, /etc/sandboxd/sandboxd.toml and "
                       "/etc/sandboxd/tokens.toml (a token of its own), and starts it")
    setup.add_argument("--user-unit", action="store_true",
                       help="as --systemd, but a user service of --user's own (systemctl "
                       "--user, lingering), its files under that user's ~/.config")
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
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="text lines (default), or one JSON object per line with the "
                       "request id and an access log ([server] log_format)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SandboxError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
