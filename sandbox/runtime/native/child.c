/*
 * The exec child of a container's init (see child.h).
 *
 * Why vfork: the parent's memory is shared rather than copied, and the child makes system
 * calls only: everything it needs (argv, envp, the BPF program, candidate paths, every
 * rlimit) is built before vfork. The parent is suspended until the child has exec'd or
 * exited.
 *
 * The child, in two halves (a child init makes ahead of its run does the first before the
 * request comes, init.c's prepare). child_prepare: default signal dispositions (of a
 * child of init: the one init catches; init made the rest default) and an empty mask,
 * setsid, nice, scheduling policy, I/O priority and personality as init had them before
 * any run, chroot into the container's root, umask, drop the bounding set, an
 * IPC namespace of its own (unless the one init is in is new: init.c's ipc_ahead), (load
 * the seccomp BPF where the calls after it pass it: child_filter_allows_release), the
 * run's cgroups (write "0" to each cgroup.procs descriptor). child_release: every rlimit,
 * CPU affinity, stdio on 0-2 (a pty's slave made the controlling terminal, for a run with
 * a terminal), chdir, clear the ambient set, setgroups/setresgid/setresuid, clear the
 * remaining capability sets, non-dumpable again (for the mm a vfork child still shares
 * with init), no_new_privs, close every other descriptor, (where child_prepare could not:
 * load the seccomp BPF), execve each candidate path. A failure is written to the
 * close-on-exec error descriptor as "<exit code>:<stage>:<errno>" and the child exits with
 * that code (125 runtime failure, 126 cannot execute, 127 not found).
 *
 * Why every piece of inheritable state is set again rather than inherited from init: a run
 * must start as the first run did, whatever an earlier run managed to change.
 */
#define _GNU_SOURCE
#include "child.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
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

static void signal_default(int sig)
{
    struct kernel_sigaction dfl;

    memset(&dfl, 0, sizeof(dfl));
    dfl.handler = SIG_DFL;
    syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(dfl.mask));
}

void signals_default(void)
{
    int i;

    for (i = 1; i < _NSIG; i++)
        if (i != SIGKILL && i != SIGSTOP)
            signal_default(i);
}

/* A child of init (with a baseline) finds every disposition at its default but the one
 * init catches, as init set them at its start (signals_default): one call rather than 64
 * (~20-30 µs of each run's path here). Any other caller's are all made default. */
static void reset_signals(const struct plan *p)
{
    sigset_t none;

    if (p->base)
        signal_default(INIT_CAUGHT_SIGNAL);
    else
        signals_default();
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Scheduling and personality as init had them before any run (or Linux's own). */
static void reset_scheduling(const struct plan *p)
{
    const struct baseline *b = p->base;
    struct sched_param param;

    if (setpriority(PRIO_PROCESS, 0, b->nice) < 0)
        fail(p, 125, "nice", errno);
    /* Looked at first: setting them costs several times as much (~5 us here). */
    if (sched_getscheduler(0) != b->policy || sched_getparam(0, &param) < 0 ||
        param.sched_priority != b->param.sched_priority)
        if (sched_setscheduler(0, b->policy, &b->param) < 0)
            fail(p, 125, "scheduler", errno);
    if (syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, b->ioprio) < 0)
        fail(p, 125, "ioprio", errno);
    /* PER_LINUX, not init's: a service started under `setarch -R` must not take address
     * space randomisation away from untrusted code. */
    if (personality(PER_LINUX) < 0)
        fail(p, 125, "personality", errno);
}

/* After the cgroup join, which set the mask to the run's cpuset (and a prepared child's
 * cgroup may have had its cpuset changed since): the kernel narrows the baseline's (or the
 * run's own, without a cpuset cgroup) to it. */
static void reset_affinity(const struct plan *p)
{
    unsigned long mask[AFFINITY_WORDS];
    unsigned int want_len = p->affinity_len ? p->affinity_len : p->base->affinity_len;
    const unsigned long *want = p->affinity_len ? p->affinity : p->base->affinity;
    long len = syscall(SYS_sched_getaffinity, 0, sizeof(mask), mask);
    if (want_len > 0 && (len != (long)want_len || memcmp(mask, want, want_len) != 0) &&
        syscall(SYS_sched_setaffinity, 0, want_len, want) < 0)
        fail(p, 125, "affinity", errno);
}

#ifdef SYS_dup2
#define DUP_TO(fd, to) syscall(SYS_dup2, fd, to)
#else
#define DUP_TO(fd, to) syscall(SYS_dup3, fd, to, 0)
#endif

/* The order matters where a step needs a capability or decides a charge: everything that
 * needs one (chroot, the bounding set, the IPC namespace) comes before the identity change
 * of child_release, and the cgroup join last, so that a prepared child's preparation
 * (the filter's load above all) is charged to the container rather than to its run. The
 * IPC namespace is made before the join: it is the run's own all the same (nothing else
 * enters it, and it goes when the run's last process does), but its few kernel objects
 * are charged to the container's memory cgroup; the run's IPC objects are charged to the
 * run's, as whoever makes them is in it. */
void child_prepare(const struct plan *p, int load_filter)
{
    int i;

    reset_signals(p);
    if (setsid() < 0)
        fail(p, 125, "setsid", errno);
    if (p->base)
        reset_scheduling(p);
    /* The container's root is below init's (which also holds the layers and what a reset
     * needs): the run enters it while it still has the capability to, and stands in its
     * root until its own cwd. */
    if (p->root && (chroot(p->root) < 0 || chdir("/") < 0))
        fail(p, 125, "chroot", errno);
    umask(022);
    for (i = 0; i <= p->last_cap; i++)
        if (!(i < 64 && (p->caps >> i & 1)) && prctl(PR_CAPBSET_DROP, i, 0, 0, 0) < 0)
            fail(p, 125, "capabilities", errno);
    if (p->new_ipc && unshare(CLONE_NEWIPC) < 0)
        fail(p, 125, "ipc", errno);
    /* cgroup v1 lets the opener of cgroup.procs (the service) move a task only when the
     * task's uid or saved uid is the opener's own, which is container root's: init runs
     * under an id of its own, so the child takes container root as its saved id for the
     * join (it is replaced by the run's in child_release). */
    if (p->ncgroup > 0 && getuid() != 0 && setresuid(-1, -1, 0) < 0)
        fail(p, 125, "cgroup", errno);
    /* From here on, only the calls child_filter_allows_release checks. */
    if (load_filter && p->prog.len > 0 &&
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &p->prog) < 0)
        fail(p, 125, "seccomp", errno);
    for (i = 0; i < p->ncgroup; i++)
        if (syscall(SYS_write, p->cgroup_fd[i], "0", 1) != 1)
            fail(p, 125, "cgroup", errno);
}

/* System calls through syscall(2) only: the list child_filter_allows_release checks is
 * then the one made, whatever libc's wrappers would choose. */
void child_release(const struct plan *p, int filter_loaded)
{
    int i, saved = ENOENT;

    for (i = 0; i < RLIMIT_NLIMITS; i++)
        if (p->rl_set[i] && syscall(SYS_prlimit64, 0, i, &p->rl[i], NULL) < 0)
            fail(p, 125, "rlimits", errno);
    if (p->base)
        reset_affinity(p);
    for (i = 0; i < 3; i++)
        if (p->stdio[i] != i ? DUP_TO(p->stdio[i], i) < 0
                             : syscall(SYS_fcntl, i, F_SETFD, 0) < 0)
            fail(p, 125, "stdio", errno);
    /* A session leader since setsid, with no terminal yet: the pty becomes its controlling
     * terminal and the run's process group its foreground, so ^C, ^Z and SIGWINCH reach the
     * run's processes (and only them). */
    if (p->ctty && syscall(SYS_ioctl, 0, TIOCSCTTY, 0) < 0)
        fail(p, 125, "tty", errno);
    /* With the capabilities still held: a cwd the run's user could not reach itself is
     * entered as it always was. */
    if (syscall(SYS_chdir, p->cwd) < 0)
        fail(p, 127, "chdir", errno);
    if (syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        fail(p, 125, "capabilities", errno);
    if (p->set_groups && syscall(SYS_setgroups, 0, NULL) < 0)
        fail(p, 125, "identity", errno);
    if (syscall(SYS_setresgid, p->gid, p->gid, p->gid) < 0 ||
        syscall(SYS_setresuid, p->uid, p->uid, p->uid) < 0)
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
    /* Each identity change above set the dumpable flag of the mm this child may still
     * share with init (a vfork child) to fs.suid_dumpable (1 on some hosts): put it back
     * before the run's program can run beside init. execve gives the program its own. */
    if (syscall(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        fail(p, 125, "dumpable", errno);
    if (syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(p, 125, "no_new_privs", errno);

    /* Everything but stdio and the close-on-exec error descriptor; a kernel without
     * close_range must not run the program with init's descriptors open. */
    if (p->err_fd > 3 && syscall(SYS_close_range, 3, p->err_fd - 1, 0) < 0)
        fail(p, 125, "close_range", errno);
    if (syscall(SYS_close_range, p->err_fd + 1, ~0U, 0) < 0)
        fail(p, 125, "close_range", errno);

    if (!filter_loaded && p->prog.len > 0 &&
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &p->prog) < 0)
        fail(p, 125, "seccomp", errno);

    for (i = 0; i < p->npaths; i++) {
        syscall(SYS_execve, p->paths[i], p->argv, p->envp);
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

/* The filter's load (~60 us, a JIT compile) before the cgroup joins where it may be: then
 * it is not counted in the run's CPU time, and the joins come when the host's recycle of
 * the last run's cgroup, which takes the kernel's cgroup mutex too, is mostly over. */
static __attribute__((noreturn)) void child(const struct plan *p)
{
    child_prepare(p, p->early_filter);
    child_release(p, p->early_filter);
}

/* ------------------------------------------------------------------------ the check */

/* One 32-bit word of the BPF machine: its value when known ahead. */
struct word {
    uint32_t v;
    int known;
};

struct bpf_check {
    const struct sock_fprog *prog;
    uint32_t data[16];     /* struct seccomp_data, as 32-bit words */
    uint32_t known;        /* which of them are known ahead */
    int budget;            /* instructions left to follow, over every path */
};

/* Whether every path from `pc` ends in RET_ALLOW, both ways taken at a jump on a value
 * not known ahead (the unknown arguments may be anything). Classic BPF jumps only forward,
 * so every path ends. */
static int all_paths_allow(struct bpf_check *c, unsigned int pc, struct word a, struct word x,
                           struct word *mem)
{
    while (pc < c->prog->len && --c->budget > 0) {
        const struct sock_filter *f = &c->prog->filter[pc];
        uint16_t code = f->code;
        struct word src = BPF_SRC(code) == BPF_X ? x : (struct word){f->k, 1};
        switch (BPF_CLASS(code)) {
        case BPF_LD:
        case BPF_LDX: {
            struct word w;
            if (BPF_MODE(code) == BPF_ABS && BPF_SIZE(code) == BPF_W && f->k % 4 == 0 &&
                f->k < 64)
                w = (struct word){c->data[f->k / 4], (int)(c->known >> (f->k / 4) & 1)};
            else if (BPF_MODE(code) == BPF_IMM)
                w = (struct word){f->k, 1};
            else if (BPF_MODE(code) == BPF_LEN)
                w = (struct word){64, 1};
            else if (BPF_MODE(code) == BPF_MEM && f->k < BPF_MEMWORDS)
                w = mem[f->k];
            else
                return 0;
            if (BPF_CLASS(code) == BPF_LD)
                a = w;
            else
                x = w;
            pc++;
            break;
        }
        case BPF_ST:
        case BPF_STX:
            if (f->k >= BPF_MEMWORDS)
                return 0;
            mem[f->k] = BPF_CLASS(code) == BPF_ST ? a : x;
            pc++;
            break;
        case BPF_ALU:
            if (BPF_OP(code) == BPF_NEG) {
                a.v = -a.v;
            } else if (!src.known) {
                a.known = 0;
            } else {
                switch (BPF_OP(code)) {
                case BPF_ADD: a.v += src.v; break;
                case BPF_SUB: a.v -= src.v; break;
                case BPF_MUL: a.v *= src.v; break;
                case BPF_AND: a.v &= src.v; break;
                case BPF_OR: a.v |= src.v; break;
                case BPF_XOR: a.v ^= src.v; break;
                case BPF_LSH: a.v = src.v < 32 ? a.v << src.v : 0; break;
                case BPF_RSH: a.v = src.v < 32 ? a.v >> src.v : 0; break;
                case BPF_DIV:
                case BPF_MOD:
                    if (src.v == 0)
                        return 0;
                    a.v = BPF_OP(code) == BPF_DIV ? a.v / src.v : a.v % src.v;
                    break;
                default:
                    return 0;
                }
            }
            pc++;
            break;
        case BPF_JMP: {
            int taken;
            if (BPF_OP(code) == BPF_JA) {
                pc += 1 + f->k;
                break;
            }
            if (!a.known || !src.known) {
                /* Either way: the first on a copy of the scratch memory. */
                struct word copy[BPF_MEMWORDS];
                memcpy(copy, mem, sizeof(copy));
                if (!all_paths_allow(c, pc + 1 + f->jt, a, x, copy))
                    return 0;
                pc += 1 + f->jf;
                break;
            }
            switch (BPF_OP(code)) {
            case BPF_JEQ: taken = a.v == src.v; break;
            case BPF_JGT: taken = a.v > src.v; break;
            case BPF_JGE: taken = a.v >= src.v; break;
            case BPF_JSET: taken = (a.v & src.v) != 0; break;
            default: return 0;
            }
            pc += 1 + (taken ? f->jt : f->jf);
            break;
        }
        case BPF_RET: {
            struct word r = BPF_RVAL(code) == BPF_A ? a : (struct word){f->k, 1};
            return r.known && (r.v & SECCOMP_RET_ACTION_FULL) == SECCOMP_RET_ALLOW;
        }
        case BPF_MISC:
            if (BPF_MISCOP(code) == BPF_TAX)
                x = a;
            else
                a = x;
            pc++;
            break;
        default:
            return 0;
        }
    }
    return 0;
}

#define U ((uint64_t)-1) /* in a call's arguments: not known ahead */

struct call {
    long nr;
    uint64_t args[6];
};

static int allows(const struct sock_fprog *prog, uint32_t arch, const struct call *k)
{
    struct word mem[BPF_MEMWORDS];
    struct bpf_check c = {.prog = prog, .budget = 1 << 16};
    int i;

    for (i = 0; i < BPF_MEMWORDS; i++) /* the kernel's scratch memory starts zeroed */
        mem[i] = (struct word){0, 1};
    c.data[0] = (uint32_t)k->nr;
    c.data[1] = arch;
    c.known = 1 | 2; /* nr and arch; not the instruction pointer (words 2 and 3) */
    for (i = 0; i < 6; i++)
        if (k->args[i] != U) {
            c.data[4 + 2 * i] = (uint32_t)k->args[i];
            c.data[5 + 2 * i] = (uint32_t)(k->args[i] >> 32);
            c.known |= 3u << (4 + 2 * i);
        }
    return all_paths_allow(&c, 0, (struct word){0, 1}, (struct word){0, 1}, mem);
}

int child_filter_allows_release(const struct sock_fprog *prog, int set_groups)
{
#if defined(__x86_64__)
    const uint32_t arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
    const uint32_t arch = AUDIT_ARCH_AARCH64;
#else
    const uint32_t arch = 0;
#endif
    /* What child_release calls after a filter loaded ahead, the arguments known ahead
     * spelled out; and the end of child_prepare (the cgroup join's write), the prepared
     * child's wait and close (init.c) and fail()'s write and exit. */
    const struct call calls[] = {
        {SYS_write, {U, U, U, U, U, U}},
        {SYS_exit_group, {U, U, U, U, U, U}},
        {SYS_recvmsg, {U, U, MSG_CMSG_CLOEXEC, U, U, U}},
        {SYS_close_range, {U, U, 0, U, U, U}},
        {SYS_sched_getaffinity, {0, U, U, U, U, U}},
        {SYS_sched_setaffinity, {0, U, U, U, U, U}},
#ifdef SYS_dup2
        {SYS_dup2, {U, U, U, U, U, U}},
#else
        {SYS_dup3, {U, U, 0, U, U, U}},
#endif
        {SYS_fcntl, {U, F_SETFD, 0, U, U, U}},
        {SYS_ioctl, {0, TIOCSCTTY, 0, U, U, U}},
        {SYS_chdir, {U, U, U, U, U, U}},
        {SYS_prctl, {PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, U}},
        {SYS_setresgid, {U, U, U, U, U, U}},
        {SYS_setresuid, {U, U, U, U, U, U}},
        {SYS_capset, {U, U, U, U, U, U}},
        {SYS_prctl, {PR_SET_DUMPABLE, 0, 0, 0, 0, U}},
        {SYS_prctl, {PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, U}},
        {SYS_execve, {U, U, U, U, U, U}},
    };
    struct call k;
    size_t i;

    if (prog->len == 0)
        return 1;
    if (arch == 0)
        return 0;
    for (i = 0; i < sizeof(calls) / sizeof(calls[0]); i++)
        if (!allows(prog, arch, &calls[i]))
            return 0;
    k = (struct call){SYS_setgroups, {0, 0, U, U, U, U}};
    if (set_groups && !allows(prog, arch, &k))
        return 0;
    for (i = 0; i < RLIMIT_NLIMITS; i++) {
        k = (struct call){SYS_prlimit64, {0, i, U, 0, U, U}};
        if (!allows(prog, arch, &k))
            return 0;
    }
    return 1;
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
