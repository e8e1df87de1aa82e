/* ptrace - inspecting other processes (security.md §7 "ptrace other process"; §3.3: seccomp
 * sandboxes must not allow ptrace, and this service is stricter than Docker).
 * Attack: a child (attacker) targets its sibling (victim): PTRACE_ATTACH, process_vm_readv
 * of a secret, kcmp, pidfd_getfd; another child tries PTRACE_TRACEME; and pid 1 (the
 * runtime's init) is seized with PTRACE_SEIZE (attach without stopping it, so a run on the
 * host by hand never stops the host's init; the tracer's exit detaches).
 * Safe outcome: every one of these fails.
 */
#include "probe.h"
#include <sys/ptrace.h>
#include <sys/uio.h>

#define SBX_KCMP_VM 1

static char secret[32] = "sbxprobe-sibling-secret";

static void attacker(void *arg)
{
    pid_t victim = (pid_t)(long)arg;

    long r = expect_fail("ptrace(ATTACH, sibling)", ptrace(PTRACE_ATTACH, victim, 0, 0));
    if (r == 0) {
        waitpid(victim, NULL, __WALL);
        ptrace(PTRACE_DETACH, victim, 0, 0);
    }

    char buf[sizeof secret] = {0};
    struct iovec local = {buf, sizeof buf}, remote = {secret, sizeof secret};
    expect_fail("process_vm_readv(sibling)", process_vm_readv(victim, &local, 1, &remote, 1, 0));

    expect_fail("kcmp(self, sibling)", syscall(SYS_kcmp, getpid(), victim, SBX_KCMP_VM, 0, 0));

    long pidfd = syscall(SYS_pidfd_open, victim, 0);
    if (pidfd >= 0) {
        close_fd(expect_fail("pidfd_getfd(sibling, 0)", syscall(SYS_pidfd_getfd, pidfd, 0, 0)));
        close_fd(pidfd);
    } else {
        note_safe("pidfd_open(sibling)=%s", en(errno));
        expect_denied("pidfd_getfd(-1)", syscall(SYS_pidfd_getfd, -1, 0, 0));
    }

    /* Last: if this succeeds, our exit detaches pid 1 again. */
    expect_fail("ptrace(SEIZE, 1)", ptrace(PTRACE_SEIZE, 1, 0, 0));
}

static void traceme(void *arg)
{
    (void)arg;
    expect_fail("ptrace(TRACEME)", ptrace(PTRACE_TRACEME, 0, 0, 0));
}

int main(void)
{
    probe_init();
    fflush(NULL);
    pid_t victim = fork();
    if (victim < 0)
        die("fork: %s", en(errno));
    if (victim == 0) {
        secret[0] = 'S'; /* touched, so the page is the victim's own */
        for (;;)
            pause();
    }
    in_child("attacker", attacker, (void *)(long)victim);
    in_child("traceme", traceme, NULL);
    kill(victim, SIGKILL);
    waitpid(victim, NULL, 0);
    return probe_finish();
}
