/*
 * sandbox.runtime._spawn: the exec child of a container's init (native/child.c) for
 * Python callers: the runtime benchmark's baseline under a seccomp filter runs the very
 * child that init runs for every exec, without init and its namespaces.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <linux/filter.h>

#include "native/child.h"

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

static int plan_rlimits(struct plan *p, PyObject *rlimits)
{
    Py_ssize_t i, n;
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
    static char *kwlist[] = {"paths", "argv", "envp", "cwd", "uid", "gid", "set_groups",
                             "rlimits", "stdio", "cgroup_fds", "bpf", "last_cap", "err_fd",
                             NULL};
    PyObject *paths, *argv, *envp, *rlimits, *stdio, *cgroup_fds;
    const char *cwd;
    Py_buffer bpf;
    unsigned int uid, gid;
    int set_groups, last_cap, err_fd;
    struct plan p;
    char **argv_c = NULL, **envp_c = NULL, **paths_c = NULL;
    Py_ssize_t i, npaths = 0;
    pid_t pid = -1;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOyIIpOOOy*ii", kwlist, &paths, &argv,
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
        goto done;
    }
    p.prog.len = (unsigned short)(bpf.len / sizeof(struct sock_filter));
    p.prog.filter = (struct sock_filter *)bpf.buf;
    if (plan_rlimits(&p, rlimits) < 0)
        goto done;
    if (!PyArg_ParseTuple(stdio, "iii", &p.stdio[0], &p.stdio[1], &p.stdio[2]))
        goto done;
    if (!PyList_Check(cgroup_fds) || PyList_GET_SIZE(cgroup_fds) > MAX_CGROUP_FDS) {
        PyErr_SetString(PyExc_ValueError, "cgroup_fds must be a short list of ints");
        goto done;
    }
    p.ncgroup = (int)PyList_GET_SIZE(cgroup_fds);
    for (i = 0; i < p.ncgroup; i++) {
        p.cgroup_fd[i] = (int)PyLong_AsLong(PyList_GET_ITEM(cgroup_fds, i));
        if (PyErr_Occurred())
            goto done;
    }
    if (!(argv_c = bytes_list(argv, "argv", NULL)) ||
        !(envp_c = bytes_list(envp, "envp", NULL)) ||
        !(paths_c = bytes_list(paths, "paths", &npaths)))
        goto done;
    p.argv = argv_c;
    p.envp = envp_c;
    p.paths = paths_c;
    p.npaths = (int)npaths;
    pid = child_spawn(&p);
    if (pid < 0)
        PyErr_SetFromErrno(PyExc_OSError);

done:
    PyBuffer_Release(&bpf);
    PyMem_Free(argv_c);
    PyMem_Free(envp_c);
    PyMem_Free(paths_c);
    return pid < 0 ? NULL : PyLong_FromLong(pid);
}

static PyMethodDef methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))spawn, METH_VARARGS | METH_KEYWORDS,
     "spawn(*, paths, argv, envp, cwd, uid, gid, set_groups, rlimits, stdio, cgroup_fds, bpf,"
     " last_cap, err_fd) -> pid\n\nvfork a run's child: cgroups, rlimits, stdio, cwd, "
     "identity, no capabilities, no_new_privs, seccomp, then execve of the first path that "
     "exists."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spawn",
                                    "The exec child of a container's init, in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
