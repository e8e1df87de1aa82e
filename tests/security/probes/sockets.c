/* sockets - address families (security.md §7 "AF_ALG / AF_VSOCK"; §3.1 AF_ALG "Copy Fail"
 * CVE-2026-31431; moby commits dec315c, 0597e05; issue #10: only the families a program
 * needs).
 * Attack: socket(AF_ALG) reaches the kernel crypto API; socket(AF_VSOCK) talks to the
 * hypervisor / host side of a VM; AF_PACKET, AF_KEY, AF_BLUETOOTH, AF_RDS... are attack
 * surface no program of a judge or a sandbox needs. The kernel reads the family as an int,
 * so 1<<32|AF_ALG is AF_ALG to it.
 * Safe outcome: every family but AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK fails with
 * EAFNOSUPPORT (as on a kernel without it), from socket() and socketpair(), whatever the
 * high bits; the four work (so the filter looks at the family, rather than refusing socket()
 * altogether, which would make the check hollow).
 */
#include "probe.h"
#include <linux/netlink.h>
#include <sys/socket.h>

#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static void expect_no_family(const char *what, long family)
{
    int sv[2];
    long rc = syscall(SYS_socket, family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (rc >= 0) {
        note_unsafe("socket(%s) succeeded", what);
        close((int)rc);
    } else if (errno != EAFNOSUPPORT) {
        note_unsafe("socket(%s)=%s, not EAFNOSUPPORT", what, en(errno));
    }
    rc = syscall(SYS_socketpair, family, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv);
    if (rc == 0) {
        note_unsafe("socketpair(%s) succeeded", what);
        close(sv[0]);
        close(sv[1]);
    } else if (errno != EAFNOSUPPORT) {
        note_unsafe("socketpair(%s)=%s, not EAFNOSUPPORT", what, en(errno));
    }
}

static void expect_family(const char *what, int family, int type, int protocol)
{
    int fd = socket(family, type | SOCK_CLOEXEC, protocol);
    if (fd < 0)
        note_unsafe("socket(%s) failed too (%s): socket() looks blocked outright, so the "
                    "checks above prove nothing", what, en(errno));
    close_fd(fd);
}

int main(void)
{
    probe_init();
    expect_no_family("AF_ALG", AF_ALG);
    expect_no_family("AF_VSOCK", AF_VSOCK);
    expect_no_family("AF_PACKET", AF_PACKET);
    expect_no_family("AF_KEY", AF_KEY);
    expect_no_family("AF_BLUETOOTH", AF_BLUETOOTH);
    expect_no_family("AF_RDS", 21);
    expect_no_family("AF_UNSPEC", AF_UNSPEC);
    expect_no_family("1<<32 | AF_ALG", (1L << 32) | AF_ALG);
    expect_no_family("1<<32 | AF_VSOCK", (1L << 32) | AF_VSOCK);
    expect_family("AF_UNIX", AF_UNIX, SOCK_STREAM, 0);
    expect_family("AF_INET", AF_INET, SOCK_STREAM, 0);
    expect_family("AF_INET6", AF_INET6, SOCK_DGRAM, 0);
    expect_family("AF_NETLINK", AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        note_unsafe("socketpair(AF_UNIX) failed (%s)", en(errno));
    else {
        close(sv[0]);
        close(sv[1]);
    }
    if (R->n_unsafe == 0)
        note_safe("only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK: the rest EAFNOSUPPORT");
    return probe_finish();
}
