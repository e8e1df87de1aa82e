/* sockets - dangerous address families (security.md §7 "AF_ALG / AF_VSOCK"; §3.1 AF_ALG
 * "Copy Fail" CVE-2026-31431; moby commits dec315c, 0597e05).
 * Attack: socket(AF_ALG) reaches the kernel crypto API; socket(AF_VSOCK) talks to the
 * hypervisor / host side of a VM.
 * Safe outcome: both fail, while socket(AF_INET) still works (so the filter looks at the
 * family, rather than refusing socket() altogether, which would make the check hollow).
 */
#include "probe.h"
#include <sys/socket.h>

#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

int main(void)
{
    probe_init();
    close_fd(expect_fail("socket(AF_ALG)", socket(AF_ALG, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)));
    close_fd(expect_fail("socket(AF_VSOCK)", socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0)));
    close_fd(expect_fail("socket(AF_VSOCK, DGRAM)", socket(AF_VSOCK, SOCK_DGRAM | SOCK_CLOEXEC, 0)));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        note_unsafe("socket(AF_INET) failed too (%s): socket() looks blocked outright, "
                    "so the checks above prove nothing",
                    en(errno));
    else
        note_safe("socket(AF_INET) works");
    close_fd(fd);
    return probe_finish();
}
