/*
 * The exec child of a container's init: vfork, then system calls only, then execve.
 * Compiled into the init binary (init.c) and into the _spawn extension (the runtime
 * benchmark's filtered baseline runs the same child).
 */
#ifndef SBX_CHILD_H
#define SBX_CHILD_H

#include <linux/filter.h>
#include <sched.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#define MAX_CGROUP_FDS 16
#define AFFINITY_WORDS 128 /* 8192 CPUs */

/* What init's children start from where a run asks nothing else: init's own state,
 * captured once before its first run (baseline_snapshot). */
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
    char *const *paths; /* where to look for the program, in order */
    int npaths;
    const char *root; /* NULL: the caller's own root */
    const char *cwd;
    uid_t uid;
    gid_t gid;
    int set_groups;
    int rl_set[RLIMIT_NLIMITS];
    struct rlimit rl[RLIMIT_NLIMITS];
    const struct baseline *base; /* NULL: only the rlimits given, nothing else reset */
    /* The run's CPUs where no cpuset cgroup keeps them (0 words: the baseline's). */
    unsigned int affinity_len;
    const unsigned long *affinity;
    int new_ipc;
    int stdio[3];
    int ctty; /* stdio is a pty's slave: make it the new session's controlling terminal */
    int ncgroup;
    int cgroup_fd[MAX_CGROUP_FDS];
    struct sock_fprog prog;
    /* A vfork child loads prog in child_prepare, before its cgroup joins, rather than last
     * (child_filter_allows_release says the calls after it pass). */
    int early_filter;
    int last_cap;
    uint64_t caps; /* kept in the bounding set; a uid-0 run holds them (its profile's) */
    int err_fd; /* close-on-exec: "<code>:<stage>:<errno>" on a failure before execve */
};

/* The baseline's rlimits in every slot of the plan (a run's own are set over them). */
void plan_rlimits_from_baseline(struct plan *p);

/* vfork the child of `p` with every signal blocked meanwhile; returns its pid, or -1 with
 * errno. The calling process's dumpable flag is what it was before, whatever the child did
 * to the memory they share. */
pid_t child_spawn(const struct plan *p);

/* The two halves of a child, for a child made ahead of its run (init.c's prepared child):
 * child_prepare does what no request decides (of `p`: base, root, new_ipc, the cgroups,
 * last_cap, caps and, with `load_filter`, prog); failures go to p->err_fd. child_release
 * does the rest from the request's plan and execs; `filter_loaded` as given to prepare. */
void child_prepare(const struct plan *p, int load_filter);
__attribute__((noreturn)) void child_release(const struct plan *p, int filter_loaded);

/* Whether `prog` lets through every system call child_release (and the end of
 * child_prepare after the filter) makes, whatever their arguments that are not known
 * ahead: then the filter can be loaded before the request comes. With `set_groups` and
 * `tty`, as the runs will. Only RET_ALLOW counts; a program this check cannot follow
 * (an instruction it does not know, the instruction pointer read) is not. */
int child_filter_allows_release(const struct sock_fprog *prog, int set_groups);

/* The calling process's rlimits, nice, scheduling, affinity and I/O priority; -1, errno. */
int baseline_snapshot(struct baseline *b);

/* The only signal init catches (on_sigchld). Init makes every disposition default at its
 * start (signals_default: ignored ones too, which exec would keep) before it installs
 * that one handler, so a child of init resets this one alone. */
#define INIT_CAUGHT_SIGNAL SIGCHLD
void signals_default(void);

#endif
