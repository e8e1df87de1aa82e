/* userns - nested user namespace (security.md §7 "nested user namespace"; §3.1 CVE-2022-0185,
 * CVE-2024-1086 start with one).
 * Attack: unshare(CLONE_NEWUSER) and clone(CLONE_NEWUSER) to become root with every
 * capability in a fresh user namespace, opening mount/netfilter code to the sandbox.
 * Safe outcome: both fail (EPERM from the seccomp filter). Each attempt runs in a child.
 */
#include "probe.h"
#include <sched.h>

static void try_unshare(void *arg)
{
    (void)arg;
    expect_fail("unshare(CLONE_NEWUSER)", unshare(CLONE_NEWUSER));
}

static void try_clone(void *arg)
{
    long flags = (long)arg;
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0L, 0L, 0L, 0L);
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    expect_fail(flags == CLONE_NEWUSER ? "clone(CLONE_NEWUSER)" : "clone(CLONE_NEWUSER|CLONE_NEWNS)",
                pid);
}

int main(void)
{
    probe_init();
    in_child("unshare(CLONE_NEWUSER)", try_unshare, NULL);
    in_child("clone(CLONE_NEWUSER)", try_clone, (void *)(long)CLONE_NEWUSER);
    in_child("clone(CLONE_NEWUSER|CLONE_NEWNS)", try_clone, (void *)(long)(CLONE_NEWUSER | CLONE_NEWNS));
    return probe_finish();
}
