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

/* The calling process's rlimits, nice, scheduling, affinity and I/O priority; -1, errno. */
int baseline_snapshot(struct baseline *b);

#endif
