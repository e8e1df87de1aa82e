/* iouring - io_uring (security.md §7 "io_uring"; §3.1: the source of most kCTF exploits;
 * Docker removed it from its allowlist, commit 0e2acd4).
 * Attack: io_uring_setup(8, &params) to get a ring, whose SQEs no seccomp filter can see.
 * Safe outcome: io_uring_setup fails (EPERM or ENOSYS); no ring is created.
 */
#include "probe.h"
#include <linux/io_uring.h>

int main(void)
{
    probe_init();
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    close_fd(expect_fail("io_uring_setup(8)", syscall(SYS_io_uring_setup, 8, &p)));
    return probe_finish();
}
