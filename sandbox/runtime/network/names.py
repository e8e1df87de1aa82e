"""What a container's name lookups find, as Docker and podman provide it: `/etc/hosts`
(localhost, and the container's hostname on loopback), `/etc/hostname`, and for `full`
`/etc/resolv.conf` naming slirp4netns's DNS forwarder (which asks the host's resolvers).
Images rarely carry these files (engines write them), and without them `localhost` does not
resolve. `none` and `proxy` keep the image's resolv.conf: there is no DNS to reach (the
proxy resolves names itself)."""

from __future__ import annotations

from sandbox.runtime.network import FULL

# slirp4netns's built-in DNS forwarder, on its 10.0.2.0/24 (slirp.py).
SLIRP_DNS = "10.0.2.3"
# Debian's address for the machine's own name: on loopback, never a route elsewhere.
HOSTNAME_ADDRESS = "127.0.1.1"


def etc_files(hostname: str, mode: str) -> tuple[tuple[str, str], ...]:
    """(path, content) of each file the runtime puts into a container's root."""
    files = [
        ("/etc/hosts", "127.0.0.1\tlocalhost\n"
                       "::1\tlocalhost ip6-localhost ip6-loopback\n"
                       f"{HOSTNAME_ADDRESS}\t{hostname}\n"),
        ("/etc/hostname", f"{hostname}\n")]
    if mode == FULL:
        files.append(("/etc/resolv.conf", f"nameserver {SLIRP_DNS}\n"))
    return tuple(files)
