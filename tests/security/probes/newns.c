/* newns - other namespaces (security.md §7 "other CLONE_NEW*", "remount proc / new mount").
 * Attack: unshare()/clone() with CLONE_NEWNS, NEWPID, NEWNET, NEWIPC, NEWUTS, NEWCGROUP (and
 * unshare(CLONE_NEWTIME)) to reach namespace-setup code paths.
 * Safe outcome: every attempt fails (EPERM from seccomp, or no capability).
 * Each attempt runs in its own child, so one success cannot affect the next.
 */
#include "probe.h"
#include <sched.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

static const struct {
    long flag;
    const char *name;
} NS[] = {
    {CLONE_NEWNS, "NEWNS"},   {CLONE_NEWPID, "NEWPID"}, {CLONE_NEWNET, "NEWNET"},
    {CLONE_NEWIPC, "NEWIPC"}, {CLONE_NEWUTS, "NEWUTS"}, {CLONE_NEWCGROUP, "NEWCGROUP"},
};

static void try_unshare(void *arg)
{
    long i = (long)arg;
    char what[64];
    snprintf(what, sizeof what, "unshare(%s)", NS[i].name);
    expect_fail(what, unshare((int)NS[i].flag));
}

static void try_clone(void *arg)
{
    long i = (long)arg;
    char what[64];
    snprintf(what, sizeof what, "clone(%s)", NS[i].name);
    long pid = syscall(SYS_clone, NS[i].flag | SIGCHLD, 0L, 0L, 0L, 0L);
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    expect_fail(what, pid);
}

static void try_newtime(void *arg)
{
    (void)arg;
    expect_fail("unshare(NEWTIME)", unshare(CLONE_NEWTIME));
}

int main(void)
{
    probe_init();
    for (long i = 0; i < (long)(sizeof NS / sizeof NS[0]); i++) {
        in_child(NS[i].name, try_unshare, (void *)i);
        in_child(NS[i].name, try_clone, (void *)i);
    }
    in_child("NEWTIME", try_newtime, NULL);
    return probe_finish();
}
