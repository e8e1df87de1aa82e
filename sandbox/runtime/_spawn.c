/*
 * sandbox.runtime._spawn: start one exec child of a container's init, in C.
 *
 * Why C: a forked Python process pays a copy-on-write fault for every page the
 * interpreter touches, and that alone cost over a millisecond per run. Here init
 * stays in Python; only the part between fork and execve is C. It uses vfork(), so
 * the parent's memory is shared rather than copied, and the child makes system calls
 * only: everything it needs (argv, envp, the BPF program, candidate paths) is built
 * before vfork. The parent is suspended until the child has exec'd or exited.
 *
 * The child, in this order: default signal dispositions, setsid, the run's cgroups
 * (write "0" to each cgroup.procs descriptor), rlimits, stdio on 0-2, chdir, umask,
 * drop the bounding and ambient capability sets, setgroups/setresgid/setresuid,
 * clear the remaining capability sets, no_new_privs, close every other descriptor,
 * load the seccomp BPF, execve each candidate path. A failure is written to the
 * close-on-exec error descriptor as "<exit code>:<stage>:<errno>" and the child
 * exits with that code (125 runtime failure, 126 cannot execute, 127 not found).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_RLIMITS 16
#define MAX_CGROUP_FDS 16

struct plan {
    char *const *argv;
    char *const *envp;
    char **paths;
    Py_ssize_t npaths;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    int set_groups;
    int nrlimits;
    int rl_resource[MAX_RLIMITS];
    struct rlimit rl_value[MAX_RLIMITS];
    int stdio[3];
    int ncgroup;
    int cgroup_fd[MAX_CGROUP_FDS];
    struct sock_fprog prog;
    int last_cap;
    int err_fd;
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

static __attribute__((noreturn)) void child(const struct plan *p)
{
    struct sigaction dfl;
    sigset_t all;
    int i, saved = ENOENT;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (i = 1; i < NSIG; i++)
        if (i != SIGKILL && i != SIGSTOP)
            sigaction(i, &dfl, NULL); /* fails harmlessly for the libc-reserved ones */
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);

    if (setsid() < 0)
        fail(p, 125, "setsid", errno);
    for (i = 0; i < p->ncgroup; i++)
        if (write(p->cgroup_fd[i], "0", 1) != 1)
            fail(p, 125, "cgroup", errno);
    for (i = 0; i < p->nrlimits; i++)
        if (setrlimit(p->rl_resource[i], &p->rl_value[i]) < 0)
            fail(p, 125, "rlimits", errno);
    for (i = 0; i < 3; i++)
        if (dup2(p->stdio[i], i) < 0)
            fail(p, 125, "stdio", errno);
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
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(p, 125, "no_new_privs", errno);

    /* Everything but stdio and the close-on-exec error descriptor. */
    if (p->err_fd > 3)
        syscall(SYS_close_range, 3, p->err_fd - 1, 0);
    syscall(SYS_close_range, p->err_fd + 1, ~0U, 0);

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

static PyObject *spawn(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"paths",  "argv",   "envp",  "cwd",      "uid",
                             "gid",    "set_groups", "rlimits", "stdio", "cgroup_fds",
                             "bpf",    "last_cap", "err_fd", NULL};
    PyObject *paths, *argv, *envp, *rlimits, *stdio, *cgroup_fds;
    const char *cwd;
    Py_buffer bpf;
    unsigned int uid, gid;
    int set_groups, last_cap, err_fd;
    struct plan p;
    char **argv_c = NULL, **envp_c = NULL;
    sigset_t all, old;
    pid_t pid;
    int saved_errno;
    Py_ssize_t i;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOyIIpOOOy*ii", kwlist, &paths, &argv,
                                     &envp, &cwd, &uid, &gid, &set_groups, &rlimits, &stdio,
                                     &cgroup_fds, &bpf, &last_cap, &err_fd))
        return NULL;
    memset(&p, 0, sizeof(p));
    p.cwd = cwd;
    p.uid = uid;
    p.gid = gid;
    p.set_groups = set_groups;
    p.last_cap = last_cap;
    p.err_fd = err_fd;
    if (bpf.len % sizeof(struct sock_filter) != 0 ||
        bpf.len / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        PyErr_SetString(PyExc_ValueError, "bpf is not a classic BPF program");
        goto error;
    }
    p.prog.len = (unsigned short)(bpf.len / sizeof(struct sock_filter));
    p.prog.filter = (struct sock_filter *)bpf.buf;

    if (!PyList_Check(rlimits) || PyList_GET_SIZE(rlimits) > MAX_RLIMITS) {
        PyErr_SetString(PyExc_ValueError, "rlimits must be a short list of (res, soft, hard)");
        goto error;
    }
    p.nrlimits = (int)PyList_GET_SIZE(rlimits);
    for (i = 0; i < p.nrlimits; i++) {
        int res;
        unsigned long long soft, hard;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(rlimits, i), "iKK", &res, &soft, &hard))
            goto error;
        p.rl_resource[i] = res;
        p.rl_value[i].rlim_cur = (rlim_t)soft;
        p.rl_value[i].rlim_max = (rlim_t)hard;
    }
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

    /* No Python signal handler may run in the child while it shares our memory. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(&p);
    saved_errno = errno;
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

static PyMethodDef methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))spawn, METH_VARARGS | METH_KEYWORDS,
     "spawn(*, paths, argv, envp, cwd, uid, gid, set_groups, rlimits, stdio, cgroup_fds, bpf,"
     " last_cap, err_fd) -> pid\n\nvfork a run's child: cgroups, rlimits, stdio, cwd, identity,"
     " no capabilities, no_new_privs, seccomp, then execve of the first path that exists."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spawn",
                                    "The exec child of a container's init, in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
