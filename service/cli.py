"""`sandboxd`: the engine's command line.

    sandboxd setup [--user NAME [--remove]] as root, once: cgroup tuning, delegation to NAME
    sandboxd info                           what this host can enforce, as JSON
    sandboxd demo                           run untrusted code in a busybox container
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from sandbox.errors import SandboxError


def _setup(args: argparse.Namespace) -> int:
    from sandbox.runtime.cgroups import delegate, detect, tuning

    if os.geteuid() != 0:
        print("sandboxd setup changes cgroup mounts and ownership: run it as root",
              file=sys.stderr)
        return 2
    if args.remove:
        if not args.user:
            print("--remove undoes a delegation: name it with --user", file=sys.stderr)
            return 2
        for path in delegate.undelegate_v1(args.user):
            print(f"removed {path}")
        return 0
    print(tuning.favor_dynmods())
    if not args.user:  # a service run as root needs only the tuning
        return 0
    found = detect()
    if found.driver is not None:
        found.driver.close()  # only asked which version this host runs
        if found.driver.version == 2:
            print(delegate.systemd_recipe_v2(args.user))
            return 0
    for path in delegate.delegate_v1(args.user):
        print(f"delegated {path} to {args.user}")
    return 0


def _info(_: argparse.Namespace) -> int:
    from sandbox.runtime import hostinfo

    print(json.dumps(hostinfo.report(), indent=2))
    return 0


DEMO_PROGRAMS = (
    ("hello", ["sh", "-c", "echo hello from $(hostname); id"], {}),
    ("escape attempt: read the host's files", ["sh", "-c", "ls /home /root; cat /etc/shadow"],
     {}),
    ("fork bomb", ["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 2"],
     {"pids": 16, "wall_ms": 3000}),
    ("CPU spin", ["sh", "-c", "while :; do :; done"], {"cpu_ms": 300}),
    ("memory bomb", ["sh", "-c", "x=a; while :; do x=$x$x; done"], {"memory_bytes": 32 << 20}),
    ("output flood", ["yes"], {"output_bytes": 4096}),
)


async def _demo_run() -> None:
    from sandbox import busybox
    from sandbox.runtime.container import ContainerSpec, ExecRequest, Runtime
    from sandbox.runtime.profiles import Limits

    runtime = await Runtime.start()
    try:
        for w in runtime.warnings:
            print(f"warning: {w}")
        with tempfile.TemporaryDirectory(prefix="sandboxd-demo-") as tmp:
            m = runtime.mapping
            root = busybox.build_rootfs(Path(tmp) / "rootfs", owner=(m.root_uid, m.root_gid))
            container = await runtime.create_container(
                ContainerSpec(layers=(str(root),), profile="judge"))
            print(f"container {container.id} ready in {container.setup_ms:.1f} ms "
                  f"(id map: {m.method}, untrusted uid {m.run_uid})\n")
            for title, argv, limits in DEMO_PROGRAMS:
                r = await container.exec(ExecRequest(argv=argv, env={"PATH": "/bin"},
                                                     limits=Limits(**limits)))
                await container.reset()
                out = (r.stdout + r.stderr).decode(errors="replace").strip()
                print(f"== {title}: {' '.join(argv)}")
                if out:
                    print("   " + "\n   ".join(out.splitlines()[:4]))
                print(f"   -> {r.status} exit={r.exit_code} signal={r.signal} "
                      f"cpu={r.cpu_ms:.1f}ms wall={r.wall_ms:.1f}ms "
                      f"peak={(r.memory_peak_bytes or 0) / 2**20:.1f}MiB\n")
            await container.destroy()
    finally:
        await runtime.close()


def _demo(_: argparse.Namespace) -> int:
    asyncio.run(_demo_run())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandboxd", description="rootless sandbox engine")
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="as root: tune cgroups, delegate a subtree to a user")
    setup.add_argument("--user", help="the ordinary user the service will run as")
    setup.add_argument("--remove", action="store_true", help="undo the delegation")
    setup.set_defaults(func=_setup)
    sub.add_parser("info", help="print what this host can enforce").set_defaults(func=_info)
    sub.add_parser("demo", help="run untrusted code in a busybox container").set_defaults(
        func=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SandboxError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
