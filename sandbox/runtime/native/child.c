/*
 * The exec child of a container's init (see child.h).
 *
 * Why vfork: the parent's memory is shared rather than copied, and the child makes system
 * calls only: everything it needs (argv, envp, the BPF program, candidate paths, every
 * rlimit) is built before vfork. The parent is suspended until the child has exec'd or
 * exited.
 *
 * The child, in this order: default signal dispositions and an empty mask, setsid, the
 * run's cgroups (write "0" to each cgroup.procs descriptor), an IPC namespace of its own,
 * every rlimit, nice, scheduling policy, CPU affinity, I/O priority and personality as init
 * had them before any run, stdio on 0-2 (a pty's slave made the controlling terminal, for
 * a run with a terminal), chroot into the container's root, chdir, umask,
 * drop the bounding and ambient capability sets, setgroups/setresgid/setresuid, clear the remaining capability sets,
 * non-dumpable again (for the mm it still shares with init), no_new_privs, close every
 * other descriptor, load the seccomp BPF, execve each candidate path. A failure is written
 * to the close-on-exec error descriptor as "<exit code>:<stage>:<errno>" and the child
 * exits with that code (125 runtime failure, 126 cannot execute, 127 not found).
 *
 * Why every piece of inheritable state is set again rather than inherited from init: a run
 * must start as the first run did, whatever an earlier run managed to change.
 */
#define _GNU_SOURCE
#include "child.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define IOPRIO_WHO_PROCESS 1

/* The kernel's struct sigaction: rt_sigaction reaches the signals glibc keeps for itself. */
struct kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* Async-signal-safe formatting: only a decimal integer and fixed strings. */
static __attribute__((noreturn)) void fail(const struct plan *p, int code, const char *stage,
                                           int err)
{
    char buf[96];
    size_t n = 0;
    char digits[12];
    int d = 0;
    buf[n++] = (char)('0' + code / 100);
    buf[n++] = (char)('0' + code / 10 % 10);
    buf[n++] = (char)('0' + code % 10);
    buf[n++] = ':';
    for (const char *s = stage; *s && n < sizeof(buf) - 14; s++)
        buf[n++] = *s;
    buf[n++] = ':';
    if (err == 0)
        digits[d++] = '0';
    while (err > 0 && d < 11) {
        digits[d++] = (char)('0' + err % 10);
        err /= 10;
    }
    while (d > 0)
        buf[n++] = digits[--d];
    write_all(p->err_fd, buf, n);
    _exit(code);
}

static void reset_signals(void)
{
    struct kernel_sigaction dfl;
    sigset_t none;
    int i;

    memset(&dfl, 0, sizeof(dfl));
    dfl.handler = SIG_DFL;
    for (i = 1; i < _NSIG; i++)
        if (i != SIGKILL && i != SIGSTOP)
            syscall(SYS_rt_sigaction, i, &dfl, NULL, sizeof(dfl.mask));
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Scheduling and personality as init had them before any run (or Linux's own). */
static void reset_scheduling(const struct plan *p)
{
    const struct baseline *b = p->base;
    struct sched_param param;
    unsigned long mask[AFFINITY_WORDS];
    long len;

    if (setpriority(PRIO_PROCESS, 0, b->nice) < 0)
        fail(p, 125, "nice", errno);
    /* Looked at first: setting them costs several times as much (~5 us here). */
    if (sched_getscheduler(0) != b->policy || sched_getparam(0, &param) < 0 ||
        param.sched_priority != b->param.sched_priority)
        if (sched_setscheduler(0, b->policy, &b->param) < 0)
            fail(p, 125, "scheduler", errno);
    /* After the cgroup join, which set the mask to the run's cpuset; the kernel narrows
     * the baseline's (or the run's own, without a cpuset cgroup) to it. */
    unsigned int want_len = p->affinity_len ? p->affinity_len : b->affinity_len;
    const unsigned long *want = p->affinity_len ? p->affinity : b->affinity;
    len = syscall(SYS_sched_getaffinity, 0, sizeof(mask), mask);
    if (want_len > 0 && (len != (long)want_len || memcmp(mask, want, want_len) != 0) &&
        syscall(SYS_sched_setaffinity, 0, want_len, want) < 0)
        fail(p, 125, "affinity", errno);
    if (syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, b->ioprio) < 0)
        fail(p, 125, "ioprio", errno);
    /* PER_LINUX, not init's: a service started under `setarch -R` must not take address
     * space randomisation away from untrusted code. */
    if (personality(PER_LINUX) < 0)
        fail(p, 125, "personality", errno);
}

static __attribute__((noreturn)) void child(const struct plan *p)
{
    int i, saved = ENOENT;

    reset_signals();
    if (setsid() < 0)
        fail(p, 125, "setsid", errno);
    /* cgroup v1 lets the opener of cgroup.procs (the service) move a task only when the
     * task's uid or saved uid is the opener's own, which is container root's: init runs
     * under an id of its own, so the child takes container root as its saved id for the
     * join (it is replaced by the run's below). */
    if (p->ncgroup > 0 && getuid() != 0 && setresuid(-1, -1, 0) < 0)
        fail(p, 125, "cgroup", errno);
    for (i = 0; i < p->ncgroup; i++)
        if (write(p->cgroup_fd[i], "0", 1) != 1)
            fail(p, 125, "cgroup", errno);
    /* After the join, so that the namespace and every IPC object of the run are charged
     * to the run's memory cgroup; they all go when the run's last process does. */
    if (p->new_ipc && unshare(CLONE_NEWIPC) < 0)
        fail(p, 125, "ipc", errno);
    for (i = 0; i < RLIMIT_NLIMITS; i++)
        if (p->rl_set[i] && setrlimit(i, &p->rl[i]) < 0)
            fail(p, 125, "rlimits", errno);
    if (p->base)
        reset_scheduling(p);
    for (i = 0; i < 3; i++)
        if (dup2(p->stdio[i], i) < 0)
            fail(p, 125, "stdio", errno);
    /* A session leader since setsid, with no terminal yet: the pty becomes its controlling
     * terminal and the run's process group its foreground, so ^C, ^Z and SIGWINCH reach the
     * run's processes (and only them). */
    if (p->ctty && ioctl(0, TIOCSCTTY, 0) < 0)
        fail(p, 125, "tty", errno);
    /* The container's root is below init's (which also holds the layers and what a reset
     * needs): the run enters it while it still has the capability to. */
    if (p->root && chroot(p->root) < 0)
        fail(p, 125, "chroot", errno);
    if (chdir(p->cwd) < 0)
        fail(p, 127, "chdir", errno);
    umask(022);

    for (i = 0; i <= p->last_cap; i++)
        if (!(i < 64 && (p->caps >> i & 1)) && prctl(PR_CAPBSET_DROP, i, 0, 0, 0) < 0)
            fail(p, 125, "capabilities", errno);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        fail(p, 125, "capabilities", errno);
    if (p->set_groups && setgroups(0, NULL) < 0)
        fail(p, 125, "identity", errno);
    if (setresgid(p->gid, p->gid, p->gid) < 0 || setresuid(p->uid, p->uid, p->uid) < 0)
        fail(p, 125, "identity", errno);
    {
        struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[2];
        /* Container root keeps its profile's capabilities (a build step's chown, say);
         * no_new_privs below then bounds what execve gives root to exactly these. Any
         * other uid holds none, as in Docker. */
        uint64_t keep = p->uid == 0 ? p->caps : 0;
        memset(data, 0, sizeof(data));
        data[0].permitted = data[0].effective = (uint32_t)keep;
        data[1].permitted = data[1].effective = (uint32_t)(keep >> 32);
        if (syscall(SYS_capset, &hdr, data) < 0)
            fail(p, 125, "capabilities", errno);
    }
    /* Each identity change above set the dumpable flag of the mm this child still shares
     * with init to fs.suid_dumpable (1 on some hosts): put it back before the run's
     * program can run beside init. execve gives the program its own flag. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        fail(p, 125, "dumpable", errno);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(p, 125, "no_new_privs", errno);

    /* Everything but stdio and the close-on-exec error descriptor; a kernel without
     * close_range must not run the program with init's descriptors open. */
    if (p->err_fd > 3 && syscall(SYS_close_range, 3, p->err_fd - 1, 0) < 0)
        fail(p, 125, "close_range", errno);
    if (syscall(SYS_close_range, p->err_fd + 1, ~0U, 0) < 0)
        fail(p, 125, "close_range", errno);

    if (p->prog.len > 0 &&
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &p->prog) < 0)
        fail(p, 125, "seccomp", errno);

    for (i = 0; i < p->npaths; i++) {
        execve(p->paths[i], p->argv, p->envp);
        /* As execvp does: keep looking past a missing entry, remember a forbidden one. */
        if (errno == EACCES)
            saved = EACCES;
        else if (errno != ENOENT && errno != ENOTDIR) {
            saved = errno;
            break;
        }
    }
    fail(p, saved == ENOENT || saved == ENOTDIR ? 127 : 126, "exec", saved);
}

void plan_rlimits_from_baseline(struct plan *p)
{
    int i;
    for (i = 0; i < RLIMIT_NLIMITS; i++) {
        p->rl_set[i] = 1;
        p->rl[i] = p->base->rl[i];
    }
}

pid_t child_spawn(const struct plan *p)
{
    sigset_t all, old;
    int was_dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), saved;
    pid_t pid;

    /* No signal handler may run in the child while it shares our memory. */
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(p);
    saved = errno;
    /* The child's identity change set our shared mm's dumpable flag (see child()); a child
     * that failed before putting it back leaves it so. */
    if (was_dumpable == 0 || was_dumpable == 1)
        prctl(PR_SET_DUMPABLE, was_dumpable, 0, 0, 0);
    sigprocmask(SIG_SETMASK, &old, NULL);
    errno = saved;
    return pid;
}

int baseline_snapshot(struct baseline *b)
{
    long n;
    int i;

    memset(b, 0, sizeof(*b));
    for (i = 0; i < RLIMIT_NLIMITS; i++)
        if (getrlimit(i, &b->rl[i]) < 0)
            return -1;
    errno = 0;
    b->nice = getpriority(PRIO_PROCESS, 0);
    if (errno != 0)
        return -1;
    if ((b->policy = sched_getscheduler(0)) < 0 || sched_getparam(0, &b->param) < 0)
        return -1;
    if ((b->ioprio = (int)syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0)) < 0)
        return -1;
    if ((n = syscall(SYS_sched_getaffinity, 0, sizeof(b->affinity), b->affinity)) < 0)
        return -1;
    b->affinity_len = (unsigned int)n;
    return 0;
}
