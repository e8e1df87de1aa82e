/* clone3 - flags hidden in a struct (security.md §7 "clone3"; §1.2 rule [20]).
 * Attack: clone3() passes its flags in memory, which seccomp cannot inspect, so an allowed
 * clone3 would let CLONE_NEW* through.
 * Safe outcome: raw clone3 fails with exactly ENOSYS (so libc falls back to clone(2), whose
 * flags are filtered), clone3 with CLONE_NEWUSER fails too, and fork() and
 * pthread_create() still work through that fallback.
 */
#include "probe.h"
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static long raw_clone3(uint64_t flags)
{
    struct clone_args_v0 a;
    memset(&a, 0, sizeof a);
    a.flags = flags;
    a.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid == 0)
        syscall(SYS_exit_group, 0); /* the child: leave at once */
    int e = errno;
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    errno = e;
    return pid;
}

static volatile int thread_ran;

static void *thread_main(void *arg)
{
    (void)arg;
    thread_ran = 1;
    return NULL;
}

int main(void)
{
    probe_init();

    long r = raw_clone3(0);
    if (r > 0)
        note_unsafe("clone3() created a child (its flags are invisible to seccomp)");
    else if (errno == ENOSYS)
        note_safe("clone3()=ENOSYS");
    else
        note_unsafe("clone3()=%s (want ENOSYS so libc falls back to clone)", en(errno));

    expect_fail("clone3(CLONE_NEWUSER)", raw_clone3(CLONE_NEWUSER));

    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0)
        _exit(7);
    int st = 0;
    if (pid < 0)
        note_unsafe("fork() failed: %s", en(errno));
    else if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
        note_unsafe("fork() child did not exit normally (status %#x)", st);
    else
        note_safe("fork() works");

    pthread_t t;
    int e = pthread_create(&t, NULL, thread_main, NULL);
    if (e != 0)
        note_unsafe("pthread_create() failed: %s", en(e));
    else if ((e = pthread_join(t, NULL)) != 0 || !thread_ran)
        note_unsafe("pthread_join() failed: %s", en(e));
    else
        note_safe("pthread_create() works");
    return probe_finish();
}
