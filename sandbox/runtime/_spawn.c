/*
 * sandbox.runtime._spawn: start one exec child of a container's init, in C.
 *
 * Why C: a forked Python process pays a copy-on-write fault for every page the
 * interpreter touches, and that alone cost over a millisecond per run. Here init
 * stays in Python; only the part between fork and execve is C. It uses vfork(), so
 * the parent's memory is shared rather than copied, and the child makes system calls
 * only: everything it needs (argv, envp, the BPF program, candidate paths, every
 * rlimit) is built before vfork. The parent is suspended until the child has exec'd
 * or exited.
 *
 * The child, in this order: default signal dispositions and an empty mask, setsid,
 * the run's cgroups (write "0" to each cgroup.procs descriptor), an IPC namespace of
 * its own, every rlimit, nice, scheduling policy, CPU affinity, I/O priority and
 * personality as init had them before any run, stdio on 0-2, chdir, umask, drop the
 * bounding and ambient capability sets, setgroups/setresgid/setresuid, clear the
 * remaining capability sets, non-dumpable again (for the mm it still shares with
 * init), no_new_privs, close every other descriptor, load the seccomp BPF, execve
 * each candidate path. A failure is written to the close-on-exec error descriptor as
 * "<exit code>:<stage>:<errno>" and the child exits with that code (125 runtime
 * failure, 126 cannot execute, 127 not found).
 *
 * Why every piece of inheritable state is set again rather than inherited from init:
 * a run must start as the first run did, whatever an earlier run managed to change.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_CGROUP_FDS 16
#define AFFINITY_WORDS 128 /* 8192 CPUs */
#define IOPRIO_WHO_PROCESS 1

/* What init's children start from where a run asks nothing else: init's own state,
 * captured once before its first run (snapshot()), handed to every spawn(). */
struct baseline {
    struct rlimit rl[RLIMIT_NLIMITS];
    int nice;
    int policy;
    struct sched_param param;
    int ioprio;
    unsigned int affinity_len;
    unsigned long affinity[AFFINITY_WORDS];
};

struct plan {
    char *const *argv;
    char *const *envp;
    char **paths;
    Py_ssize_t npaths;
    const char *root; /* NULL: init's own root */
    const char *cwd;
    uid_t uid;
    gid_t gid;
    int set_groups;
    int rl_set[RLIMIT_NLIMITS];
    struct rlimit rl[RLIMIT_NLIMITS];
    const struct baseline *base; /* NULL: only the rlimits given, nothing else reset */
    int new_ipc;
    int stdio[3];
    int ncgroup;
    int cgroup_fd[MAX_CGROUP_FDS];
    struct sock_fprog prog;
    int last_cap;
    int err_fd;
};

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
     * the baseline's to it. */
    len = syscall(SYS_sched_getaffinity, 0, sizeof(mask), mask);
    if (b->affinity_len > 0 &&
        (len != (long)b->affinity_len || memcmp(mask, b->affinity, b->affinity_len) != 0) &&
        syscall(SYS_sched_setaffinity, 0, b->affinity_len, b->affinity) < 0)
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
    /* The container's root is below init's (which also holds the layers and what a reset
     * needs): the run enters it while it still has the capability to. */
    if (p->root && chroot(p->root) < 0)
        fail(p, 125, "chroot", errno);
    if (chdir(p->cwd) < 0)
        fail(p, 127, "chdir", errno);
    umask(022);

    for (i = 0; i <= p->last_cap; i++)
        if (prctl(PR_CAPBSET_DROP, i, 0, 0, 0) < 0)
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
        memset(data, 0, sizeof(data));
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

static char **bytes_list(PyObject *seq, const char *what, Py_ssize_t *count)
{
    Py_ssize_t n, i;
    char **out;
    if (!PyList_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of bytes", what);
        return NULL;
    }
    n = PyList_GET_SIZE(seq);
    out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (!out)
        return (char **)PyErr_NoMemory();
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(seq, i);
        if (!PyBytes_Check(item)) {
            PyMem_Free(out);
            PyErr_Format(PyExc_TypeError, "%s must be a list of bytes", what);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(item); /* borrowed: the list outlives the call */
    }
    if (count)
        *count = n;
    return out;
}

/* The run's rlimits over the baseline's (all of them), or only the run's without one. */
static int plan_rlimits(struct plan *p, PyObject *rlimits)
{
    Py_ssize_t i, n;
    if (p->base) {
        for (i = 0; i < RLIMIT_NLIMITS; i++) {
            p->rl_set[i] = 1;
            p->rl[i] = p->base->rl[i];
        }
    }
    if (!PyList_Check(rlimits)) {
        PyErr_SetString(PyExc_ValueError, "rlimits must be a list of (res, soft, hard)");
        return -1;
    }
    n = PyList_GET_SIZE(rlimits);
    for (i = 0; i < n; i++) {
        int res;
        unsigned long long soft, hard;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(rlimits, i), "iKK", &res, &soft, &hard))
            return -1;
        if (res < 0 || res >= RLIMIT_NLIMITS) {
            PyErr_Format(PyExc_ValueError, "rlimit resource %d is not one of Linux's", res);
            return -1;
        }
        p->rl_set[res] = 1;
        p->rl[res].rlim_cur = (rlim_t)soft;
        p->rl[res].rlim_max = (rlim_t)hard;
    }
    return 0;
}

static PyObject *spawn(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"paths",  "argv",   "envp",  "cwd",      "uid",
                             "gid",    "set_groups", "rlimits", "stdio", "cgroup_fds",
                             "bpf",    "last_cap", "err_fd", "baseline", "new_ipc", "root", NULL};
    PyObject *paths, *argv, *envp, *rlimits, *stdio, *cgroup_fds, *baseline = Py_None;
    const char *cwd, *root = NULL;
    Py_buffer bpf;
    unsigned int uid, gid;
    int set_groups, last_cap, err_fd, new_ipc = 0, was_dumpable;
    struct plan p;
    char **argv_c = NULL, **envp_c = NULL;
    sigset_t all, old;
    pid_t pid;
    int saved_errno;
    Py_ssize_t i;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOyIIpOOOy*ii|$Opz", kwlist,
                                     &paths, &argv, &envp, &cwd, &uid, &gid, &set_groups,
                                     &rlimits, &stdio, &cgroup_fds, &bpf, &last_cap, &err_fd,
                                     &baseline, &new_ipc, &root))
        return NULL;
    memset(&p, 0, sizeof(p));
    p.root = root;
    p.cwd = cwd;
    p.uid = uid;
    p.gid = gid;
    p.set_groups = set_groups;
    p.last_cap = last_cap;
    p.err_fd = err_fd;
    p.new_ipc = new_ipc;
    if (baseline != Py_None) {
        if (!PyBytes_Check(baseline) ||
            PyBytes_GET_SIZE(baseline) != (Py_ssize_t)sizeof(struct baseline)) {
            PyErr_SetString(PyExc_ValueError, "baseline must be what snapshot() returned");
            goto error;
        }
        p.base = (const struct baseline *)PyBytes_AS_STRING(baseline);
    }
    if (bpf.len % sizeof(struct sock_filter) != 0 ||
        bpf.len / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        PyErr_SetString(PyExc_ValueError, "bpf is not a classic BPF program");
        goto error;
    }
    p.prog.len = (unsigned short)(bpf.len / sizeof(struct sock_filter));
    p.prog.filter = (struct sock_filter *)bpf.buf;
    if (plan_rlimits(&p, rlimits) < 0)
        goto error;
    if (!PyArg_ParseTuple(stdio, "iii", &p.stdio[0], &p.stdio[1], &p.stdio[2]))
        goto error;
    if (!PyList_Check(cgroup_fds) || PyList_GET_SIZE(cgroup_fds) > MAX_CGROUP_FDS) {
        PyErr_SetString(PyExc_ValueError, "cgroup_fds must be a short list of ints");
        goto error;
    }
    p.ncgroup = (int)PyList_GET_SIZE(cgroup_fds);
    for (i = 0; i < p.ncgroup; i++) {
        p.cgroup_fd[i] = (int)PyLong_AsLong(PyList_GET_ITEM(cgroup_fds, i));
        if (PyErr_Occurred())
            goto error;
    }
    if (!(argv_c = bytes_list(argv, "argv", NULL)) ||
        !(envp_c = bytes_list(envp, "envp", NULL)) ||
        !(p.paths = bytes_list(paths, "paths", &p.npaths)))
        goto error;
    p.argv = argv_c;
    p.envp = envp_c;

    was_dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    /* No Python signal handler may run in the child while it shares our memory. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(&p);
    saved_errno = errno;
    /* The child's identity change set our shared mm's dumpable flag (see child()); a
     * child that failed before putting it back leaves it so. */
    if (was_dumpable == 0 || was_dumpable == 1)
        prctl(PR_SET_DUMPABLE, was_dumpable, 0, 0, 0);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    PyBuffer_Release(&bpf);
    PyMem_Free(argv_c);
    PyMem_Free(envp_c);
    PyMem_Free(p.paths);
    if (pid < 0) {
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(pid);

error:
    PyBuffer_Release(&bpf);
    PyMem_Free(argv_c);
    PyMem_Free(envp_c);
    PyMem_Free(p.paths);
    return NULL;
}

static PyObject *snapshot(PyObject *self, PyObject *noargs)
{
    struct baseline b;
    long n;
    int i;

    memset(&b, 0, sizeof(b));
    for (i = 0; i < RLIMIT_NLIMITS; i++)
        if (getrlimit(i, &b.rl[i]) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    errno = 0;
    b.nice = getpriority(PRIO_PROCESS, 0);
    if (errno != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((b.policy = sched_getscheduler(0)) < 0 || sched_getparam(0, &b.param) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((b.ioprio = (int)syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((n = syscall(SYS_sched_getaffinity, 0, sizeof(b.affinity), b.affinity)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    b.affinity_len = (unsigned int)n;
    return PyBytes_FromStringAndSize((const char *)&b, sizeof(b));
}

static PyObject *become(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"uid", "gid", "set_groups", NULL};
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    unsigned int uid, gid;
    int set_groups;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$IIp", kwlist, &uid, &gid, &set_groups))
        return NULL;
    /* Leaving uid 0 would clear every capability; keep the permitted set across the
     * change, then raise the effective set from it again. */
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 ||
        (set_groups && setgroups(0, NULL) < 0) ||
        setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0 ||
        syscall(SYS_capget, &hdr, data) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    data[0].effective = data[0].permitted;
    data[1].effective = data[1].permitted;
    if (syscall(SYS_capset, &hdr, data) < 0 || prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0 ||
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))spawn, METH_VARARGS | METH_KEYWORDS,
     "spawn(*, paths, argv, envp, cwd, uid, gid, set_groups, rlimits, stdio, cgroup_fds, bpf,"
     " last_cap, err_fd, baseline=None, new_ipc=False, root=None) -> pid\n\nvfork a run's "
     "child: cgroups, an IPC namespace of its own (new_ipc), rlimits over the baseline's and "
     "the baseline's scheduling (baseline: from snapshot()), stdio, chroot to root, cwd, "
     "identity, no capabilities, no_new_privs, seccomp, then execve of the first path that exists."},
    {"snapshot", snapshot, METH_NOARGS,
     "snapshot() -> bytes\n\nThe calling process's rlimits, nice, scheduling policy, CPU "
     "affinity and I/O priority, for spawn(baseline=...)."},
    {"become", (PyCFunction)(void (*)(void))become, METH_VARARGS | METH_KEYWORDS,
     "become(*, uid, gid, set_groups) -> None\n\nMove the calling process to uid/gid "
     "(and no supplementary groups with set_groups) keeping its capabilities, and make it "
     "non-dumpable again."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spawn",
                                    "The exec child of a container's init, in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
