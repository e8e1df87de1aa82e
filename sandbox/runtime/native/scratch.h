/*
 * The container's resettable tmpfs mounts (after pivot_root), and which of them a reset
 * must give back empty by mounting them anew.
 *
 * A mount no run changed is left as it is: remounting costs more than the run of a small
 * program. Its root directory's ctime moves with every entry made or removed (a file
 * cannot exist on the tmpfs without one) and every change to the directory itself, and
 * nothing in the container can set a ctime back. On a kernel without fine-grained
 * timestamps the ctime moves in clock ticks, so a change made within the tick the mount
 * was made in would not show: a mount counts as unchanged only when its ctime is as it was
 * and nothing began within that tick.
 */
#ifndef SBX_SCRATCH_H
#define SBX_SCRATCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "mp.h"

struct tmpfs_mount {
    char *target;
    uint64_t size;
    unsigned int mode;
    uint64_t inodes;       /* 0: the kernel's default */
    unsigned long flags;   /* mount(2) flags */
    dev_t dev;             /* the mark: what the root directory was after mounting */
    int64_t ctime_ns;
};

struct scratch {
    struct tmpfs_mount *mounts;
    int n;
    int doubt;             /* something began within the tick of a mark */
};

/* From the config's "resettable" (an array of {target, size, mode, inodes, flags}), and
 * their marks as they are now. 0, or -1 with `err` filled. */
int scratch_init(struct scratch *s, const struct mp_value *list, char *err, size_t n);

/* A run starts, or a file is opened for the host: what it changes must show. */
void scratch_touching(struct scratch *s);

/* Remount every mount that may have changed; 0, or -1 with `err` filled. */
int scratch_reset(struct scratch *s, char *err, size_t n);

#endif
