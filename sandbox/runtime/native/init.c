/*
 * sbx-init's init: a container's pid 1, starting one child per exec. The binary is also
 * the spawner's helper and the id mapper (main.c).
 *
 * The helper clones init into the container's namespaces once it has made its filesystem.
 * Init's configuration is a map of the request the helper received (init_main, init.h):
 * started_ns, seccomp_bpf, last_cap, caps, set_groups, init_id ([uid, gid] or nil), mounts
 * (its part of the mount plan: mounts.h), root, files, resettable and writable
 * (scratch.h). It mounts
 * /proc and pivots into the new root, moves to its own id (where the map has more than
 * one), captures the state every child starts from, reports "ready" and serves its
 * control socket (SOCK_SEQPACKET, one
 * MessagePack map per datagram, descriptors as SCM_RIGHTS; see sandbox/runtime/protocol.py):
 * exec, signal, reset, open and bind, answered by the events exited, reset, opened and
 * bound (and pty, before exited, for an exec with a terminal: its master).
 *
 * Init is hostile ground: it is non-dumpable, holds no host file, handles no signal but
 * SIGCHLD and, where the id map has more than one id, runs under an id that no run may
 * take (so no run can change what init's later children inherit). Untrusted code never
 * runs in it: each exec vforks a child (child.c), or releases the child init made ahead
 * for it (prepare, below: a pool's container, reset after each run, has its next run's
 * child waiting, made off that run's path). Init reaps everything (orphans are
 * re-parented to it) and reports each run's wait status and rusage. A malformed request is
 * dropped with its descriptors; init never ends but with its control socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "channel.h"
#include "child.h"
#include "hostopen.h"
#include "init.h"
#include "mounts.h"
#include "mp.h"
#include "proctitle.h"
#include "scratch.h"


#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"
#define DEVPTS_MAGIC 0x1cd1
#define TTY_MAX 1000 /* rows and columns, as the API bounds them */

struct config {
    struct sock_fprog prog;
    int last_cap;                /* init drops its bounding set to caps (drop_bounding_set) */
    uint64_t caps;               /* the profile's capabilities: a uid-0 run keeps these */
    int set_groups;              /* false under a "single" id map (setgroups is denied) */
    int early_filter;            /* children load the filter before their cgroup joins */
    struct baseline base;        /* what children start from */
};

struct run {
    int64_t id;
    pid_t pid;
    int64_t start_ns;
    int err_r;
    int reset_after;
    char *cwd;                   /* what chdir and exec acted on, for error messages */
    char *program;
    int prepared;                /* -1: not asked for; else whether the prepared child ran */
};

/* The next run's child, made ahead (see prepare): it waits on `sock` for its request. */
struct prepared {
    pid_t pid;                   /* 0: none */
    int sock;                    /* init's end of their socketpair */
    int err_r;                   /* as a run's: the child's error, or EOF at its execve */
};

struct exec_req;
static void prepare(void);
static int ctl = -1;
static struct config cfg;
static struct scratch scratch;
static int tidy_failed;          /* idle work failed once: told, not tried again */
static int bind_failed;          /* a bind whose exec followed it failed: refuse that exec */
static struct run *runs;
static int nruns, runs_cap;
static volatile sig_atomic_t child_exited;
static struct prepared prep = {0, -1, -1};
/* The next run's cgroup.procs descriptors, given by the host with an exec ("prepare");
 * -1: none given. A prepared child is made into them; the next exec uses them. */
static int next_fds[MAX_CGROUP_FDS];
static int nnext = -1;
/* A released prepared child's plan: written by init, read by the child, shared since
 * before its fork (init's memory after the fork is not the child's). Used by one child at
 * a time: a prepared child exists only while no run does (it is released, or killed, at
 * the next exec). */
#define REGION_SIZE (256 << 10)
static struct exec_req *region;
/* How long the host took, lately, from the end of a reset to the next exec: a moving
 * average, each new gap weighing a quarter. A child made ahead needs ~0.6-0.8 ms of a CPU
 * to be ready (the fork, being scheduled, the filter's load, the cgroup joins), and a fork
 * costs more CPU than a vfork. It pays only when a CPU is idle between runs: measured on 2
 * cores, runs 1-3 ms apart with idle CPUs took 0.7-1.0 ms less, but back to back the next
 * exec found the child still preparing (no gain), and over HTTP, with the client and the
 * service busy on both cores between runs, runs took 10-13 % longer and 8 clients got
 * 13-17 % fewer runs/s. So the child is made only for a container whose runs come
 * PREPARE_MIN_GAP_NS apart or more: traffic sparse enough to leave the CPUs idle. */
#define PREPARE_MIN_GAP_NS 20000000
static int64_t gap_avg_ns;      /* 0 until measured: a new container prepares nothing */
static int64_t reset_done_ns;    /* the last reset's end, until the next exec (0: none) */

/* Every run has an IPC namespace of its own: its objects go when its last process does,
 * and no other run ever sees them. Making one (copy_ipcs: a new mqueue superblock among
 * the rest) cost a vfork child 40-100 us on its run's path. Init makes the next run's in
 * its idle time instead: it enters a new namespace, which its next vfork child inherits;
 * once a child has it, init leaves it for a new one at its next idle moment (the child
 * makes its own when none was ready). Init makes no IPC object of its own, and no other
 * process enters init's namespaces (a child made ahead makes its own). */
static int ipc_fresh; /* init's IPC namespace is one no child has had */

static void ipc_ahead(void)
{
    if (!ipc_fresh && unshare(CLONE_NEWIPC) == 0)
        ipc_fresh = 1;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void close_fds(const int *fds, int n)
{
    int i;
    for (i = 0; i < n; i++)
        close(fds[i]);
}

/* One message, with at most one descriptor. A host that is gone shows up on the next read. */
static void send_msg(const struct mp_writer *w, int fd)
{
    if (!w->overflow)
        channel_send(ctl, w->buf, w->len, fd);
}

static void put_key(struct mp_writer *w, const char *key)
{
    mp_w_cstr(w, key);
}

/* ------------------------------------------------------------------------ the runs */

static struct run *find_run(pid_t pid)
{
    int i;
    for (i = 0; i < nruns; i++)
        if (runs[i].pid == pid)
            return &runs[i];
    return NULL;
}

static void drop_run(struct run *r)
{
    if (r->err_r >= 0)
        close(r->err_r);
    free(r->cwd);
    free(r->program);
    *r = runs[--nruns];
}

/* As pid 1, kill(-1) reaches every other process of the pid namespace. It walks every
 * process of the host, so it is skipped when init has no child: every process of the
 * namespace descends from init, an orphan is re-parented to it, so there is none. */
static void kill_all_and_reap(void)
{
    siginfo_t info;
    if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD)
        return;
    kill(-1, SIGKILL);
    for (;;) {
        if (waitpid(-1, NULL, 0) < 0 && errno != EINTR)
            return;
    }
}

/* Init's side of the prepared child, once it is gone (reaped, or killed with the rest). */
static void prep_forget(void)
{
    if (prep.sock >= 0)
        close(prep.sock);
    if (prep.err_r >= 0)
        close(prep.err_r);
    prep = (struct prepared){0, -1, -1};
}

/* Kill the prepared child and wait for it (a run it was not made for is about to start:
 * it must not be there, in the pids count of the cgroup it joined or in /proc). */
static void prep_discard(void)
{
    if (prep.pid > 0) {
        kill(prep.pid, SIGKILL);
        while (waitpid(prep.pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    prep_forget();
}

/* Everything a reset does, in order: every process but init ends (the runs with it, told
 * nothing more), then the scratch mounts a run may have changed come back empty. NULL, or
 * what failed (the container is then not reused). */
static const char *reset_container(int remount)
{
    static char err[1024];
    while (nruns > 0)
        drop_run(&runs[0]);
    kill_all_and_reap();
    prep_forget();
    if (remount && scratch_reset(&scratch, err, sizeof(err)) < 0)
        return err;
    return NULL;
}

static void send_reset(const char *error)
{
    struct mp_writer w = {.len = 0};
    mp_w_map(&w, 2);
    put_key(&w, "ev");
    mp_w_cstr(&w, "reset");
    put_key(&w, "error");
    if (error)
        mp_w_cstr(&w, error);
    else
        mp_w_nil(&w);
    send_msg(&w, -1);
}

/* An exec's reset_after: before init reads the host's next request, so that request finds
 * the container reset without waiting for a reply; only a failure is told (then it is not
 * reused). */
static void reset_after(int wanted)
{
    const char *error;
    if (!wanted)
        return;
    if ((error = reset_container(1)) != NULL)
        send_reset(error);
    else
        prepare();
}

/* The child's "<code>:<stage>:<errno>", made readable: "<code>:<stage> <what>: <message>".
 * The pipe is closed before the run's end is told: after it, init holds nothing of the run. */
static void read_error(struct run *r, struct mp_writer *w)
{
    char data[4096], out[8192];
    char *stage, *err;
    const char *what = NULL;
    ssize_t n;

    do
        n = read(r->err_r, data, sizeof(data) - 1);
    while (n < 0 && errno == EINTR);
    close(r->err_r);
    r->err_r = -1;
    if (n <= 0) {
        mp_w_nil(w);
        return;
    }
    data[n] = 0;
    if (!(stage = strchr(data, ':')) || !(err = strchr(stage + 1, ':'))) {
        mp_w_str(w, data, (size_t)n);
        return;
    }
    *stage++ = 0;
    *err++ = 0;
    if (strcmp(stage, "chdir") == 0)
        what = r->cwd;
    else if (strcmp(stage, "exec") == 0)
        what = r->program;
    snprintf(out, sizeof(out), "%s:%s%s%s: %s", data, stage, what ? " " : "", what ? what : "",
             *err && strspn(err, "0123456789") == strlen(err) ? strerror(atoi(err)) : err);
    mp_w_cstr(w, out);
}

static void send_exited(struct run *r, int status, const struct rusage *ru)
{
    struct mp_writer w = {.len = 0};
    mp_w_map(&w, r->prepared >= 0 ? 8 : 7);
    put_key(&w, "ev");
    mp_w_cstr(&w, "exited");
    if (r->prepared >= 0) {
        put_key(&w, "prepared");
        mp_w_bool(&w, r->prepared);
    }
    put_key(&w, "id");
    mp_w_int(&w, r->id);
    put_key(&w, "status");
    mp_w_int(&w, status);
    put_key(&w, "start_ns");
    mp_w_int(&w, r->start_ns);
    put_key(&w, "end_ns");
    mp_w_int(&w, now_ns());
    put_key(&w, "rusage");
    mp_w_map(&w, 3);
    put_key(&w, "utime_ns");
    mp_w_int(&w, (int64_t)ru->ru_utime.tv_sec * 1000000000 + ru->ru_utime.tv_usec * 1000);
    put_key(&w, "stime_ns");
    mp_w_int(&w, (int64_t)ru->ru_stime.tv_sec * 1000000000 + ru->ru_stime.tv_usec * 1000);
    put_key(&w, "maxrss_kb");
    mp_w_int(&w, ru->ru_maxrss);
    put_key(&w, "error");
    read_error(r, &w);
    send_msg(&w, -1);
}

static void reap(void)
{
    struct rusage ru;
    struct run *r;
    int status, again;
    pid_t pid;

    while ((pid = wait4(-1, &status, WNOHANG, &ru)) > 0) {
        if (pid == prep.pid) {
            /* It failed before its request came: the next exec takes today's path. */
            prep_forget();
            continue;
        }
        if ((r = find_run(pid)) == NULL)
            continue;
        send_exited(r, status, &ru);
        again = r->reset_after;
        drop_run(r);
        reset_after(again);
    }
}

/* ------------------------------------------------------------------------ exec */

/* What a request's exec needs, copied out of the message (whose strings are not
 * NUL-terminated) into one block freed once the child has exec'd. */
struct exec_req {
    int64_t id;
    int has_id;
    int reset_after;
    int tty;                     /* 0-2 are a new pty of this size (rows, cols) */
    struct winsize size;
    struct plan plan;
    void *block;
    int shared;                  /* the block is in the region (not to be freed) */
    char *cwd;
    char *program;
    unsigned long affinity[AFFINITY_WORDS]; /* the plan's, when the exec names its cpus */
};

static char *copy_str(char **at, const uint8_t *s, size_t n)
{
    char *out = *at;
    memcpy(out, s, n);
    out[n] = 0;
    *at += n + 1;
    return out;
}

/* Where execvp would look, but with the run's PATH rather than init's. */
static int count_paths(const char *program, size_t n, const uint8_t *path, size_t plen,
                       size_t *bytes)
{
    size_t i, start = 0;
    int count = 0;
    if (memchr(program, '/', n)) {
        *bytes += n + 1;
        return 1;
    }
    for (i = 0; i <= plen; i++)
        if (i == plen || path[i] == ':') {
            *bytes += (i > start ? i - start : 1) + 1 + n + 1;
            count++;
            start = i + 1;
        }
    return count;
}

static void exec_free(struct exec_req *e)
{
    if (!e->shared)
        free(e->block);
}

/* Where the region's block starts: after the exec_req a released child reads. */
#define REGION_BLOCK ((sizeof(struct exec_req) + 15) & ~(size_t)15)

/* With `in_region`, the block goes in the region when it fits there (e->shared). */
static const char *parse_exec(const struct mp_value *msg, const int *fds, int nfds,
                              struct exec_req *e, int in_region)
{
    struct mp_value argv, env, cwd, v, item, k, val, path = {0};
    const uint8_t *p;
    size_t bytes = 0, plen;
    const uint8_t *pdata;
    char **ptrs, *at;
    int64_t x;
    uint32_t i;
    int npaths, has_path = 0, nstdio = 3;

    memset(e, 0, sizeof(*e));
    if (mp_get(msg, "id", &v) == 0 && mp_int(&v, INT64_MIN, INT64_MAX, &e->id) == 0)
        e->has_id = 1;
    if (mp_get(msg, "reset_after", &v) == 0 && v.type == MP_BOOL)
        e->reset_after = (int)v.u;
    if (!e->has_id)
        return "'id' must be an int";
    /* "tty": [rows, cols]: the run's 0-2 are a pty init makes, so the host sends none. */
    if (mp_get(msg, "tty", &v) == 0 && v.type != MP_NIL) {
        int64_t rows, cols;
        if (v.type != MP_ARRAY || v.len != 2 || mp_item(&v, 0, &item) < 0 ||
            mp_int(&item, 1, TTY_MAX, &rows) < 0 || mp_item(&v, 1, &item) < 0 ||
            mp_int(&item, 1, TTY_MAX, &cols) < 0)
            return "'tty' must be [rows, cols], each 1..1000";
        e->tty = 1;
        e->size.ws_row = (unsigned short)rows;
        e->size.ws_col = (unsigned short)cols;
        nstdio = 0;
    }
    if (nfds < nstdio)
        return "an exec needs stdin, stdout and stderr descriptors";
    if (nfds - nstdio > MAX_CGROUP_FDS)
        return "too many cgroup descriptors";
    if (nfds > nstdio && mp_get(msg, "prepared", &v) == 0 && v.type == MP_BOOL && v.u)
        return "an exec in the prepared cgroup carries no cgroup descriptors";
    if (mp_get(msg, "argv", &argv) < 0 || argv.type != MP_ARRAY || argv.len == 0)
        return "'argv' must be a list of at least one string";
    if (mp_get(msg, "env", &env) < 0 || env.type != MP_MAP)
        return "'env' must be a map of strings";
    if (mp_get(msg, "cwd", &cwd) < 0 || !mp_is_bytes(&cwd))
        return "'cwd' must be a string";
    if (mp_get(msg, "uid", &v) < 0 || mp_int(&v, 0, UINT32_MAX - 1, &x) < 0)
        return "'uid' must be an id";
    e->plan.uid = (uid_t)x;
    if (mp_get(msg, "gid", &v) < 0 || mp_int(&v, 0, UINT32_MAX - 1, &x) < 0)
        return "'gid' must be an id";
    e->plan.gid = (gid_t)x;

    e->plan.base = &cfg.base;
    plan_rlimits_from_baseline(&e->plan);
    /* "cpus": the host has no cpuset cgroup to keep the run on them (see run.py). */
    if (mp_get(msg, "cpus", &v) == 0 && v.type != MP_NIL) {
        int64_t cpu;
        if (v.type != MP_ARRAY || v.len == 0 || cfg.base.affinity_len == 0)
            return "'cpus' must be a non-empty list of CPU numbers";
        for (i = 0; i < v.len; i++) {
            if (mp_item(&v, i, &item) < 0 ||
                mp_int(&item, 0, (int64_t)cfg.base.affinity_len * 8 - 1, &cpu) < 0)
                return "'cpus' must be a non-empty list of CPU numbers this host has";
            e->affinity[cpu / (8 * sizeof(long))] |= 1UL << (cpu % (8 * sizeof(long)));
        }
        e->plan.affinity = e->affinity;
        e->plan.affinity_len = cfg.base.affinity_len;
    }
    if (mp_get(msg, "rlimits", &v) == 0 && v.type != MP_NIL) {
        if (v.type != MP_ARRAY)
            return "'rlimits' must be a list of [resource, soft, hard]";
        for (i = 0; i < v.len; i++) {
            struct mp_value r, s, h;
            int64_t res;
            if (mp_item(&v, i, &item) < 0 || item.type != MP_ARRAY || item.len != 3 ||
                mp_item(&item, 0, &r) < 0 || mp_item(&item, 1, &s) < 0 ||
                mp_item(&item, 2, &h) < 0 || s.type != MP_INT || h.type != MP_INT ||
                mp_int(&r, 0, RLIMIT_NLIMITS - 1, &res) < 0)
                return "'rlimits' must be a list of [resource, soft, hard]";
            /* -1 is RLIM_INFINITY, as Python's resource module has it */
            e->plan.rl[res].rlim_cur = s.negative ? (rlim_t)s.i : (rlim_t)s.u;
            e->plan.rl[res].rlim_max = h.negative ? (rlim_t)h.i : (rlim_t)h.u;
        }
    }

    /* Sizes first, then one block for every string and pointer array. */
    if (memchr(cwd.data, 0, cwd.len))
        return "'cwd' contains a NUL byte";
    p = argv.data;
    for (i = 0; i < argv.len; i++) {
        if (mp_read(&p, argv.end, &item) < 0 || item.type != MP_STR ||
            memchr(item.data, 0, item.len))
            return "'argv' must be a list of at least one string without NUL bytes";
        bytes += item.len + 1;
    }
    p = env.data;
    for (i = 0; i < env.len; i++) {
        if (mp_read(&p, env.end, &k) < 0 || mp_read(&p, env.end, &val) < 0 ||
            k.type != MP_STR || val.type != MP_STR || memchr(k.data, 0, k.len) ||
            memchr(val.data, 0, val.len))
            return "'env' must be a map of strings without NUL bytes";
        bytes += k.len + 1 + val.len + 1;
        if (k.len == 4 && memcmp(k.data, "PATH", 4) == 0) {
            path = val;
            has_path = 1;
        }
    }
    bytes += cwd.len + 1;
    mp_item(&argv, 0, &item);
    pdata = has_path ? path.data : (const uint8_t *)DEFAULT_PATH;
    plen = has_path ? path.len : strlen(DEFAULT_PATH);
    npaths = count_paths((const char *)item.data, item.len, pdata, plen, &bytes);
    bytes += item.len + 1;
    bytes += sizeof(char *) * ((size_t)argv.len + 1 + env.len + 1 + (size_t)npaths + 1);

    if (in_region && bytes <= REGION_SIZE - REGION_BLOCK) {
        e->block = (char *)region + REGION_BLOCK;
        e->shared = 1;
    } else if (!(e->block = malloc(bytes))) {
        return "out of memory";
    }
    ptrs = e->block;
    e->plan.argv = ptrs;
    e->plan.envp = ptrs + argv.len + 1;
    e->plan.paths = ptrs + argv.len + 1 + env.len + 1;
    at = (char *)(ptrs + argv.len + 1 + env.len + 1 + npaths + 1);
    p = argv.data;
    for (i = 0; i < argv.len; i++) {
        mp_read(&p, argv.end, &item);
        ptrs[i] = copy_str(&at, item.data, item.len);
    }
    ptrs[argv.len] = NULL;
    ptrs += argv.len + 1;
    p = env.data;
    for (i = 0; i < env.len; i++) {
        mp_read(&p, env.end, &k);
        mp_read(&p, env.end, &val);
        ptrs[i] = at;
        memcpy(at, k.data, k.len);
        at[k.len] = '=';
        memcpy(at + k.len + 1, val.data, val.len);
        at[k.len + 1 + val.len] = 0;
        at += k.len + 1 + val.len + 1;
    }
    ptrs[env.len] = NULL;
    ptrs += env.len + 1;
    e->cwd = copy_str(&at, cwd.data, cwd.len);
    e->program = copy_str(&at, (const uint8_t *)e->plan.argv[0], strlen(e->plan.argv[0]));
    if (strchr(e->program, '/')) {
        ptrs[0] = copy_str(&at, (const uint8_t *)e->program, strlen(e->program));
        e->plan.npaths = 1;
    } else {
        size_t start = 0, j;
        for (j = 0; j <= plen; j++)
            if (j == plen || pdata[j] == ':') {
                /* An empty entry is the current directory, as execvp has it. */
                ptrs[e->plan.npaths++] = at;
                at += sprintf(at, "%.*s/%s", (int)(j > start ? j - start : 1),
                              j > start ? (const char *)pdata + start : ".", e->program) + 1;
                start = j + 1;
            }
    }
    ptrs[e->plan.npaths] = NULL;

    e->plan.root = scratch_root(&scratch);
    e->plan.cwd = e->cwd;
    e->plan.set_groups = cfg.set_groups;
    for (i = 0; i < (uint32_t)nstdio; i++)
        e->plan.stdio[i] = fds[i];
    e->plan.ncgroup = nfds - nstdio;
    for (i = 0; i < (uint32_t)e->plan.ncgroup; i++)
        e->plan.cgroup_fd[i] = fds[nstdio + i];
    e->plan.prog = cfg.prog;
    e->plan.early_filter = cfg.early_filter;
    e->plan.last_cap = -1; /* init's bounding set is the run's already */
    e->plan.caps = cfg.caps;
    return NULL;
}

static void send_spawn_failure(const struct exec_req *e, int64_t start, const char *why)
{
    struct mp_writer w = {.len = 0};
    char error[1024];
    snprintf(error, sizeof(error), "125:spawn: %s", why);
    mp_w_map(&w, 6);
    put_key(&w, "ev");
    mp_w_cstr(&w, "exited");
    put_key(&w, "id");
    if (e->has_id)
        mp_w_int(&w, e->id);
    else
        mp_w_nil(&w);
    put_key(&w, "status");
    mp_w_nil(&w);
    put_key(&w, "start_ns");
    mp_w_int(&w, start);
    put_key(&w, "end_ns");
    mp_w_int(&w, now_ns());
    put_key(&w, "error");
    mp_w_cstr(&w, error);
    send_msg(&w, -1);
}

/* The run's terminal: a new pty of the container's own devpts instance, its slave owned by
 * the run's user (as login does), its size set. The ptmx is checked to be a devpts ptmx, so
 * whatever a run did to the paths, init opens nothing else. Returns the master and the
 * slave in *slave, or -1 with errno. */
static int open_pty(const struct exec_req *e, int *slave)
{
    char path[PATH_MAX];
    struct stat st;
    struct statfs fs;
    int m, s, unlock = 0, err;

    snprintf(path, sizeof(path), "%s/dev/pts/ptmx", scratch_root(&scratch));
    /* Non-blocking: the host reads and writes the master from its event loop. */
    if ((m = open(path, O_RDWR | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)) < 0)
        return -1;
    if (fstat(m, &st) < 0 || fstatfs(m, &fs) < 0)
        goto failed;
    if (!S_ISCHR(st.st_mode) || st.st_rdev != makedev(5, 2) || fs.f_type != DEVPTS_MAGIC) {
        errno = ENODEV;
        goto failed;
    }
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0 || ioctl(m, TIOCSWINSZ, &e->size) < 0)
        goto failed;
    /* The slave through the master, not by path: no lookup a run could redirect. */
    if ((s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
        goto failed;
    if (fchown(s, e->plan.uid, e->plan.gid) < 0) {
        err = errno;
        close(s);
        errno = err;
        goto failed;
    }
    *slave = s;
    return m;
failed:
    err = errno;
    close(m);
    errno = err;
    return -1;
}

/* {ev: pty, id} with the master: sent before the child exists, so the master is never
 * among the descriptors the child inherits, and before the run's "exited". */
static void send_pty(const struct exec_req *e, int master)
{
    struct mp_writer w = {.len = 0};
    mp_w_map(&w, 2);
    put_key(&w, "ev");
    mp_w_cstr(&w, "pty");
    put_key(&w, "id");
    mp_w_int(&w, e->id);
    send_msg(&w, master);
}

/* ------------------------------------------------------------------------ prepared */

/* The prepared child: child_prepare, then nothing of init's held but what its wait and
 * its run need, then a wait for its request: "g" with the run's 0-2 (three descriptors,
 * or one: a pty's slave), its plan in the region. Init closing its end first (a reset
 * killed it anyway) ends it. */
static __attribute__((noreturn)) void prepared_child(const struct plan *p, int sock)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * 3)];
        struct cmsghdr align;
    } u;
    char go = 0;
    struct iovec iov = {&go, 1};
    struct msghdr mh;
    struct cmsghdr *c;
    struct plan q;
    int fds[3], nfds = 0, lo = sock < p->err_fd ? sock : p->err_fd;
    int hi = sock < p->err_fd ? p->err_fd : sock, i;
    long n;

    close(ctl);
    child_prepare(p, cfg.early_filter);
    if ((lo > 3 && syscall(SYS_close_range, 3, lo - 1, 0) < 0) ||
        (hi > lo + 1 && syscall(SYS_close_range, lo + 1, hi - 1, 0) < 0) ||
        syscall(SYS_close_range, hi + 1, ~0U, 0) < 0)
        _exit(125);
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof(u.buf);
    do
        n = syscall(SYS_recvmsg, sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n != 1 || go != 'g')
        _exit(0);
    for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds + nfds, CMSG_DATA(c), sizeof(int) * (size_t)(k > 3 - nfds ? 3 - nfds : k));
            nfds += k > 3 - nfds ? 3 - nfds : k;
        }
    if (nfds != 1 && nfds != 3)
        _exit(125);
    q = region->plan;
    q.err_fd = p->err_fd;
    for (i = 0; i < 3; i++)
        q.stdio[i] = fds[nfds == 1 ? 0 : i];
    child_release(&q, cfg.early_filter);
}

/*
 * When the container is idle again after a reset (every process but init gone, the root
 * and scratch mounts given back), the next run's child is made at once (while its runs
 * come far enough apart: gap_avg_ns), off the next request's path, into the cgroups the
 * host gave for the next run: fork (init goes on), then child_prepare. The next exec releases it (do_exec), or kills it first when it is not
 * the one it was made for. So it exists only while no run does, no run can reach it before
 * its own, and whatever it holds of init's memory is a copy of init's before the fork.
 */
static void prepare(void)
{
    struct plan p;
    int sv[2], errp[2];
    pid_t pid;

    reset_done_ns = now_ns();
    if (nnext < 0 || prep.pid > 0 || nruns > 0 || region == NULL ||
        gap_avg_ns < PREPARE_MIN_GAP_NS)
        return;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return;
    if (pipe2(errp, O_CLOEXEC) < 0) {
        close(sv[0]);
        close(sv[1]);
        return;
    }
    memset(&p, 0, sizeof(p));
    p.base = &cfg.base;
    p.root = scratch_root(&scratch);
    p.new_ipc = 1;
    p.ncgroup = nnext;
    memcpy(p.cgroup_fd, next_fds, sizeof(int) * (size_t)nnext);
    p.prog = cfg.prog;
    p.last_cap = -1; /* init's bounding set is the run's already */
    p.caps = cfg.caps;
    p.err_fd = errp[1];
    pid = fork();
    if (pid == 0)
        prepared_child(&p, sv[1]);
    close(sv[1]);
    close(errp[1]);
    if (pid < 0) {
        close(sv[0]);
        close(errp[0]);
        return;
    }
    prep = (struct prepared){pid, sv[0], errp[0]};
}

/* The prepared child's request: its plan into the region, then "g" and its 0-2. Returns
 * the child's pid (its error pipe in *err_r), or -1 when it is gone (then forgotten). */
static pid_t release(const struct exec_req *e, int *err_r)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * 3)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {"g", 1};
    struct msghdr mh;
    struct cmsghdr *c;
    int n = e->plan.ctty ? 1 : 3;
    pid_t pid;

    memcpy(region, e, sizeof(*e));
    region->plan.affinity = e->plan.affinity_len ? region->affinity : NULL;
    memset(&mh, 0, sizeof(mh));
    memset(&u, 0, sizeof(u));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
    c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
    memcpy(CMSG_DATA(c), e->plan.stdio, sizeof(int) * (size_t)n);
    while (sendmsg(prep.sock, &mh, MSG_NOSIGNAL) < 0)
        if (errno != EINTR) {
            prep_discard();
            return -1;
        }
    pid = prep.pid;
    *err_r = prep.err_r;
    prep.err_r = -1;
    prep_forget();
    return pid;
}

static void do_exec(const struct mp_value *msg, int *fds, int nfds)
{
    struct exec_req e;
    struct mp_value v;
    const char *bad = NULL;
    char why[256];
    int pipefd[2] = {-1, -1};
    int slave = -1, master, i, prepared, used = 0, keep[MAX_CGROUP_FDS], nkeep = -1;
    int64_t start, k;
    pid_t pid = -1;

    scratch_touching(&scratch);
    start = now_ns();
    if (reset_done_ns != 0) {
        gap_avg_ns = gap_avg_ns / 4 * 3 + (start - reset_done_ns) / 4;
        reset_done_ns = 0;
    }
    /* "prepare": k, the last k descriptors are the next run's cgroups, kept for it. */
    if (mp_get(msg, "prepare", &v) == 0 && v.type != MP_NIL) {
        if (mp_int(&v, 0, MAX_CGROUP_FDS, &k) < 0 || k > nfds) {
            bad = "'prepare' must be a number of cgroup descriptors";
        } else {
            nkeep = (int)k;
            nfds -= nkeep;
            memcpy(keep, fds + nfds, sizeof(int) * (size_t)nkeep);
        }
    }
    /* "prepared": this run's cgroups are the ones kept for it. Whatever this exec is, it
     * is the next one: what was kept is used by it or never, and the prepared child is
     * released to it or killed before it starts. */
    prepared = mp_get(msg, "prepared", &v) == 0 && v.type == MP_BOOL && v.u;
    memset(&e, 0, sizeof(e));
    if (bad == NULL)
        bad = parse_exec(msg, fds, nfds, &e, prepared && prep.pid > 0);
    if (bad == NULL && prepared) {
        if (nnext < 0) {
            bad = "'prepared' without a cgroup kept for it";
        } else {
            e.plan.ncgroup = nnext;
            memcpy(e.plan.cgroup_fd, next_fds, sizeof(int) * (size_t)nnext);
        }
    }
    if (bad == NULL && bind_failed)
        bad = "a file for the run could not be bound (see the bind's answer)";
    bind_failed = 0;
    /* Not made for this exec (it did not ask for it), too big for the region, or refused:
     * the prepared child is killed before anything of this exec starts. */
    if (prep.pid > 0 && (bad != NULL || !e.shared))
        prep_discard();
    if (bad == NULL && e.tty) {
        if ((master = open_pty(&e, &slave)) < 0) {
            snprintf(why, sizeof(why), "opening the run's terminal: [Errno %d] %s", errno,
                     strerror(errno));
            bad = why;
        } else {
            send_pty(&e, master);
            close(master);
            for (i = 0; i < 3; i++)
                e.plan.stdio[i] = slave;
            e.plan.ctty = 1;
        }
    }
    if (bad == NULL && prep.pid > 0) {
        start = now_ns();
        if ((pid = release(&e, &pipefd[0])) > 0)
            used = 1;
    }
    if (bad == NULL && !used && pipe2(pipefd, O_CLOEXEC) < 0) {
        snprintf(why, sizeof(why), "[Errno %d] %s", errno, strerror(errno));
        bad = why;
    }
    if (bad == NULL && !used) {
        e.plan.err_fd = pipefd[1];
        e.plan.new_ipc = !ipc_fresh;
        start = now_ns();
        pid = child_spawn(&e.plan);
        ipc_fresh = 0;
        if (pid < 0) {
            snprintf(why, sizeof(why), "[Errno %d] %s", errno, strerror(errno));
            bad = why;
        }
        /* The child's identity change may have left the mm it shared with init dumpable. */
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        close(pipefd[1]);
    }
    if (slave >= 0)
        close(slave);
    close_fds(fds, nfds);
    if (nnext >= 0) {
        close_fds(next_fds, nnext);
        nnext = -1;
    }
    if (bad != NULL) {
        /* The host forgets the next cgroup it gave with a refused exec. */
        if (nkeep > 0)
            close_fds(keep, nkeep);
        if (pipefd[0] >= 0)
            close(pipefd[0]);
        exec_free(&e);
        send_spawn_failure(&e, start, bad);
        reset_after(e.reset_after); /* files copied in for the run may be there */
        return;
    }
    if (nkeep >= 0) {
        memcpy(next_fds, keep, sizeof(int) * (size_t)nkeep);
        nnext = nkeep;
    }
    if (nruns == runs_cap) {
        int cap = runs_cap ? runs_cap * 2 : 8;
        struct run *more = realloc(runs, sizeof(*runs) * (size_t)cap);
        if (!more) {
            /* Unlikely; the run goes on unobserved rather than init ending. */
            kill(-pid, SIGKILL);
            close(pipefd[0]);
            exec_free(&e);
            send_spawn_failure(&e, start, "out of memory");
            return;
        }
        runs = more;
        runs_cap = cap;
    }
    runs[nruns++] = (struct run){e.id, pid, start, pipefd[0], e.reset_after,
                                 strdup(e.cwd), strdup(e.program), prepared ? used : -1};
    exec_free(&e);
}

/* ------------------------------------------------------------------------ other ops */

/* The child called setsid, so its process group carries its id; members that left the
 * group are found through the run's cgroup on the host side. */
static void do_signal(const struct mp_value *msg)
{
    struct mp_value v;
    int64_t id, sig;
    int i;
    if (mp_get(msg, "id", &v) < 0 || mp_int(&v, INT64_MIN, INT64_MAX, &id) < 0 ||
        mp_get(msg, "signal", &v) < 0 || mp_int(&v, 1, 64, &sig) < 0)
        return;
    for (i = 0; i < nruns; i++)
        if (runs[i].id == id) {
            kill(-runs[i].pid, (int)sig);
            kill(runs[i].pid, (int)sig);
        }
}

static void do_reset(const struct mp_value *msg)
{
    struct mp_value v;
    const char *error;
    int remount = 1;
    if (mp_get(msg, "remount", &v) == 0 && v.type == MP_BOOL)
        remount = (int)v.u;
    /* The host asks for a reset with no run under way: an exec that never came behind a
     * failed bind (its sender raised first) is not waited for any more. */
    bind_failed = 0;
    error = reset_container(remount);
    send_reset(error);
    if (error == NULL && remount)
        prepare();
}

static void do_open(const struct mp_value *msg)
{
    static struct failure f;
    struct mp_writer w = {.len = 0};
    struct mp_value v;
    struct open_bases bases = {scratch_root(&scratch), scratch_upper(&scratch)};
    int64_t id = 0;
    int has_id, fd, opaque;

    scratch_touching(&scratch);
    has_id = mp_get(msg, "id", &v) == 0 && mp_int(&v, INT64_MIN, INT64_MAX, &id) == 0;
    fd = open_for_host(msg, &bases, &opaque, &f);
    mp_w_map(&w, fd < 0 ? 4 : opaque >= 0 ? 3 : 2);
    put_key(&w, "ev");
    mp_w_cstr(&w, "opened");
    put_key(&w, "id");
    if (has_id)
        mp_w_int(&w, id);
    else
        mp_w_nil(&w);
    if (fd < 0) {
        put_key(&w, "errno");
        mp_w_int(&w, f.err ? f.err : EINVAL);
        put_key(&w, "error");
        mp_w_cstr(&w, f.why);
    } else if (opaque >= 0) {
        put_key(&w, "opaque");
        mp_w_bool(&w, opaque);
    }
    send_msg(&w, fd);
    if (fd >= 0)
        close(fd);
}

/* A blob's name: 64 lowercase hex digits, and ".x" for its executable variant (see
 * sandbox/engine/filecache.py); nothing that could lead elsewhere. */
static int is_blob_name(const struct mp_value *v)
{
    uint32_t i;
    if (v->type != MP_STR || (v->len != 64 && (v->len != 66 || memcmp(v->data + 64, ".x", 2))))
        return 0;
    for (i = 0; i < 64; i++)
        if (!((v->data[i] >= '0' && v->data[i] <= '9') || (v->data[i] >= 'a' && v->data[i] <= 'f')))
            return 0;
    return 1;
}

/* {op: bind, id, owner: [uid, gid], binds: [{path, blob, exec}], exec_follows}: each cached
 * file bound at its path (scratch_bind), in order, until one fails; answered once, "bound"
 * with the failure's index, errno and reason, and whether the blob (rather than the path)
 * failed. What was bound before a failure stays until the next reset, as a put's file
 * would. With exec_follows, the host sent the run's exec right behind this request without
 * waiting for the answer (a round trip less per run): after a failure that exec is refused,
 * and a success is not answered at all. */
static void do_bind(const struct mp_value *msg)
{
    static struct failure f;
    struct mp_writer w = {.len = 0};
    struct mp_value v, list, item, path, blob, ex;
    char name[67];
    uid_t owner[2];
    int64_t id = 0, x;
    int has_id, fd, blob_failed = 0, k;
    uint32_t i = 0;

    scratch_touching(&scratch);
    f.err = 0;
    has_id = mp_get(msg, "id", &v) == 0 && mp_int(&v, INT64_MIN, INT64_MAX, &id) == 0;
    /* Whatever is wrong with the request, an exec sent behind it must not run; set until
     * every bind is made. */
    bind_failed = mp_get(msg, "exec_follows", &v) == 0 && v.type == MP_BOOL && v.u;
    if (mp_get(msg, "owner", &v) < 0 || v.type != MP_ARRAY || v.len != 2) {
        snprintf(f.why, sizeof(f.why), "bad bind request: 'owner' must be [uid, gid]");
        f.err = EINVAL;
        goto answer;
    }
    for (k = 0; k < 2; k++) {
        if (mp_item(&v, (uint32_t)k, &item) < 0 || mp_int(&item, 0, UINT32_MAX - 1, &x) < 0) {
            snprintf(f.why, sizeof(f.why), "bad bind request: 'owner' must be [uid, gid]");
            f.err = EINVAL;
            goto answer;
        }
        owner[k] = (uid_t)x;
    }
    if (mp_get(msg, "binds", &list) < 0 || list.type != MP_ARRAY) {
        snprintf(f.why, sizeof(f.why), "bad bind request: 'binds' must be a list");
        f.err = EINVAL;
        goto answer;
    }
    for (i = 0; i < list.len; i++) {
        if (mp_item(&list, i, &item) < 0 || mp_get(&item, "path", &path) < 0 ||
            !mp_is_bytes(&path) || mp_get(&item, "blob", &blob) < 0 || !is_blob_name(&blob) ||
            mp_get(&item, "exec", &ex) < 0 || ex.type != MP_BOOL) {
            snprintf(f.why, sizeof(f.why), "bad bind request: each bind is {path, blob: 64 "
                     "lowercase hex digits (and .x), exec: bool}");
            f.err = EINVAL;
            goto answer;
        }
        fd = open_mount_point(scratch_root(&scratch), (const char *)path.data, path.len, owner,
                              &f);
        if (fd < 0)
            goto answer;
        /* The same path bound again (a session's execs are not reset between them): the
         * new bind replaces the old, rather than piling mounts up. */
        if ((k = scratch_unbind_at(&scratch, fd, f.why, sizeof(f.why))) != 0) {
            close(fd);
            if (k < 0) {
                f.err = errno ? errno : EIO;
                goto answer;
            }
            fd = open_mount_point(scratch_root(&scratch), (const char *)path.data, path.len,
                                  owner, &f);
            if (fd < 0)
                goto answer;
        }
        memcpy(name, blob.data, blob.len);
        name[blob.len] = 0;
        if ((k = scratch_bind(&scratch, name, fd, (int)ex.u, f.why, sizeof(f.why))) < 0) {
            f.err = errno ? errno : EIO;
            blob_failed = k == SCRATCH_BLOB_FAILED;
        }
        close(fd);
        if (f.err)
            goto answer;
    }
answer:
    if (!f.err && bind_failed) {
        /* Behind a request whose exec follows, success goes untold: the exec's own answer
         * says it (a failure comes first, on the same socket), a message and a wake-up of
         * the host less per run. */
        bind_failed = 0;
        return;
    }
    mp_w_map(&w, f.err ? 6 : 2);
    put_key(&w, "ev");
    mp_w_cstr(&w, "bound");
    put_key(&w, "id");
    if (has_id)
        mp_w_int(&w, id);
    else
        mp_w_nil(&w);
    if (f.err) {
        put_key(&w, "index");
        mp_w_int(&w, i);
        put_key(&w, "errno");
        mp_w_int(&w, f.err);
        put_key(&w, "error");
        mp_w_cstr(&w, f.why);
        put_key(&w, "blob");
        mp_w_bool(&w, blob_failed);
    }
    send_msg(&w, -1);
}

/* ------------------------------------------------------------------------ the channel */

static uint8_t inline_buf[INLINE_MAX];

/* Read and serve one request; returns 0 when the host has closed its end. */
static int serve_one(void)
{
    struct mp_value msg, op;
    int fds[MAX_FDS], nfds = 0, cut;
    uint8_t *data = inline_buf, *body = NULL;
    size_t len;
    ssize_t n;

    n = channel_recv(ctl, inline_buf, sizeof(inline_buf), fds, &nfds, MSG_DONTWAIT, &cut);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR || errno == ENOMEM ? 1 : 0;
    if (n == 0 && nfds == 0)
        return 0;
    len = (size_t)n;
    if (cut)
        goto drop;
    if (len == sizeof(IN_MEMFD) && memcmp(data, IN_MEMFD, len) == 0) {
        if (nfds == 0)
            goto drop;
        body = read_all(fds[nfds - 1], &len);
        close(fds[--nfds]);
        if (!body)
            goto drop;
        data = body;
    }
    if (mp_parse(data, len, &msg) < 0 || msg.type != MP_MAP || mp_get(&msg, "op", &op) < 0 ||
        op.type != MP_STR)
        goto drop;
    if (op.len == 4 && memcmp(op.data, "exec", 4) == 0) {
        do_exec(&msg, fds, nfds); /* closes the descriptors */
        free(body);
        return 1;
    }
    /* Only an exec carries descriptors; any other's would stay open. */
    close_fds(fds, nfds);
    nfds = 0;
    if (op.len == 6 && memcmp(op.data, "signal", 6) == 0)
        do_signal(&msg);
    else if (op.len == 5 && memcmp(op.data, "reset", 5) == 0)
        do_reset(&msg);
    else if (op.len == 4 && memcmp(op.data, "open", 4) == 0)
        do_open(&msg);
    else if (op.len == 4 && memcmp(op.data, "bind", 4) == 0)
        do_bind(&msg);
drop:
    close_fds(fds, nfds);
    free(body);
    return 1;
}

/* ------------------------------------------------------------------------ setup */

static void on_sigchld(int sig)
{
    (void)sig;
    child_exited = 1;
}

static __attribute__((noreturn)) void setup_failed(const char *what, int err)
{
    struct mp_writer w = {.len = 0};
    char msg[512];
    if (err)
        snprintf(msg, sizeof(msg), "container setup failed: %s: %s", what, strerror(err));
    else
        snprintf(msg, sizeof(msg), "container setup failed: %s", what);
    mp_w_map(&w, 2);
    put_key(&w, "ev");
    mp_w_cstr(&w, "error");
    put_key(&w, "message");
    mp_w_cstr(&w, msg);
    send_msg(&w, -1);
    _exit(1);
}

/* Move to uid/gid (no supplementary groups) keeping every capability: leaving uid 0 would
 * clear them, so the permitted set is kept across the change and the effective set raised
 * from it again. An identity change clears the parent-death signal: set again. */
static void become(uid_t uid, gid_t gid)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 || setgroups(0, NULL) < 0 ||
        setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0 ||
        syscall(SYS_capget, &hdr, data) < 0)
        setup_failed("moving to init's own id", errno);
    data[0].effective = data[0].permitted;
    data[1].effective = data[1].permitted;
    if (syscall(SYS_capset, &hdr, data) < 0 || prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0 ||
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 || prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        setup_failed("moving to init's own id", errno);
}

/* The bounding set every run starts with (the profile's capabilities), dropped once here
 * and inherited by each child, rather than dropped by each run's child: one prctl per
 * capability, each making a new set of credentials, was ~5 % of init's CPU per run of
 * `true` (41 calls). Init never execs, and no run can change init's set, so each child
 * starts from exactly this one. */
static void drop_bounding_set(void)
{
    int i;
    for (i = 0; i <= cfg.last_cap; i++)
        if (!(i < 64 && (cfg.caps >> i & 1)) && prctl(PR_CAPBSET_DROP, i, 0, 0, 0) < 0)
            setup_failed("dropping the capability bounding set", errno);
}

static int64_t read_config(const struct mp_value *root, int skeleton)
{
    static char err[1024];
    struct mp_value v, item;
    int64_t started = 0, x;

    if (root->type != MP_MAP)
        setup_failed("init's configuration is not a MessagePack map", 0);
    if (mp_get(root, "started_ns", &v) == 0)
        mp_int(&v, 0, INT64_MAX, &started);
    if (mp_get(root, "seccomp_bpf", &v) < 0 || v.type != MP_BIN ||
        v.len % sizeof(struct sock_filter) != 0 || v.len / sizeof(struct sock_filter) > 4096)
        setup_failed("seccomp_bpf is not a classic BPF program", 0);
    /* Kept for init's life: the buffer is never freed. */
    cfg.prog.len = (unsigned short)(v.len / sizeof(struct sock_filter));
    cfg.prog.filter = (struct sock_filter *)v.data;
    if (mp_get(root, "last_cap", &v) < 0 || mp_int(&v, -1, 63, &x) < 0)
        setup_failed("last_cap is missing", 0);
    cfg.last_cap = (int)x;
    if (mp_get(root, "caps", &v) == 0 && v.type != MP_NIL) {
        if (v.type != MP_INT || v.negative)
            setup_failed("caps must be a capability mask", 0);
        cfg.caps = v.u;
    }
    if (mp_get(root, "set_groups", &v) < 0 || v.type != MP_BOOL)
        setup_failed("set_groups is missing", 0);
    cfg.set_groups = (int)v.u;
    if (mp_get(root, "init_id", &v) == 0 && v.type != MP_NIL) {
        int64_t uid, gid;
        if (mp_item(&v, 0, &item) < 0 || mp_int(&item, 0, UINT32_MAX - 1, &uid) < 0 ||
            mp_item(&v, 1, &item) < 0 || mp_int(&item, 0, UINT32_MAX - 1, &gid) < 0)
            setup_failed("init_id must be [uid, gid]", 0);
        become((uid_t)uid, (gid_t)gid);
    }
    if (mp_get(root, "mounts", &v) < 0 || mounts_execute(&v, err, sizeof(err)) < 0)
        setup_failed(err[0] ? err : "mounts is missing", 0);
    if (scratch_init(&scratch, root, skeleton, err, sizeof(err)) < 0)
        setup_failed(err, 0);
    return started;
}

/* Everything but the control socket closed, and /dev/null (the container's: the
filesystem is made by now) on 0-2, so that received descriptors never land there, where the
child's dup2 would be a no-op leaving them close-on-exec. */
static void close_host_descriptors(void)
{
    char devnull[PATH_MAX];
    struct rlimit rl;
    int fd, i;
    if ((ctl > 0 && syscall(SYS_close_range, 0, ctl - 1, 0) < 0) ||
        syscall(SYS_close_range, ctl + 1, ~0U, 0) < 0) {
        /* A kernel without close_range (5.9): one by one. */
        getrlimit(RLIMIT_NOFILE, &rl);
        for (fd = 0; fd < (int)rl.rlim_cur; fd++)
            if (fd != ctl)
                close(fd);
    }
    snprintf(devnull, sizeof(devnull), "%s/dev/null", scratch_root(&scratch));
    for (i = 0; i < 3; i++)
        if ((fd = open(devnull, O_RDWR)) != i)
            setup_failed("could not place /dev/null on descriptors 0-2", fd < 0 ? errno : 0);
}

/* Whether a request waits on the control socket. */
static int request_pending(void)
{
    struct pollfd p = {.fd = ctl, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

int init_main(int control, const struct mp_value *config, int skeleton)
{
    struct sigaction sa;
    sigset_t chld, none;
    struct pollfd pfd;
    struct mp_writer w = {.len = 0};
    int64_t started;

    /* Only as pid 1 of its own namespace: elsewhere its resets' kill(-1) would reach every
     * process the caller may signal. */
    if (getpid() != 1)
        return 1;
    ctl = control;
    /* Cloned from the helper, with its command line ("sbx-helper helper ..."). */
    proctitle_set("sbx-init");
    started = read_config(config, skeleton);
    drop_bounding_set();
    /* Die with the spawner, its parent (set at the clone too; an identity change clears
     * it). */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    close_host_descriptors();
    if (baseline_snapshot(&cfg.base) < 0)
        setup_failed("reading init's limits and scheduling", errno);
    cfg.early_filter = child_filter_allows_release(&cfg.prog, cfg.set_groups);
    /* Without it, no child is made ahead: every run takes the vfork path. */
    region = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED)
        region = NULL;

    /* As pid 1 of its namespace, init gets only the signals it handles (from outside,
     * SIGKILL and SIGSTOP too), whatever the other dispositions: the spawner's ignored
     * ones, which exec kept, go back to default, so that its children inherit defaults
     * and reset only INIT_CAUGHT_SIGNAL. SIGCHLD is blocked but while init waits, so that
     * it interrupts only the wait. */
    signals_default();
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigchld;
    sigemptyset(&sa.sa_mask);
    sigaction(INIT_CAUGHT_SIGNAL, &sa, NULL);
    sigemptyset(&chld);
    sigaddset(&chld, INIT_CAUGHT_SIGNAL);
    sigprocmask(SIG_SETMASK, &chld, NULL);
    sigemptyset(&none);

    mp_w_map(&w, 3);
    put_key(&w, "ev");
    mp_w_cstr(&w, "ready");
    put_key(&w, "setup_ns");
    mp_w_int(&w, started ? now_ns() - started : 0);
    put_key(&w, "filter_ahead");
    mp_w_bool(&w, cfg.early_filter);
    send_msg(&w, -1);

    pfd.fd = ctl;
    pfd.events = POLLIN;
    for (;;) {
        /* Children first: the processes of a killed run are reaped before a request that
         * came in the same wake-up starts the next run, which would see them in /proc. */
        if (child_exited) {
            child_exited = 0;
            reap();
        }
        /* Idle work (the next run's IPC namespace, a writable root's old mounts to
         * detach, its spare to make) waits for a moment with no request pending, so that
         * it delays no run. A failure of the tidy is told once (the host then stops using
         * the container). */
        if ((!ipc_fresh || (scratch_untidy(&scratch) && !tidy_failed)) && !request_pending()) {
            static char err[1024];
            ipc_ahead();
            if (scratch_untidy(&scratch) && !tidy_failed &&
                scratch_tidy(&scratch, err, sizeof(err)) < 0) {
                tidy_failed = 1;
                send_reset(err);
            }
        }
        if (ppoll(&pfd, 1, NULL, &none) < 0)
            continue;
        if (child_exited)
            continue;
        if (pfd.revents && !serve_one())
            break;
    }
    kill_all_and_reap();
    return 0;
}
