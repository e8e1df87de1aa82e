/*
 * What a reset gives back as it was (after pivot_root): the container's resettable tmpfs
 * mounts, each mounted anew, and a writable root, made anew in place, when a run changed
 * them (rootfs.WritableRoot says how; rootfs.ROOT is where the root is).
 *
 * What no run changed is left as it is: remounting costs more than the run of a small
 * program. A tmpfs's root directory's ctime moves with every entry made or removed (a file
 * cannot exist on the tmpfs without one) and every change to the directory itself; so does
 * a writable root's upper directory's, which starts empty: overlayfs copies up a changed
 * file's top-level directory into it first (and the root directory's own mode, owner or
 * xattrs are the upper directory's). Nothing in the container can set a ctime back. On a
 * kernel without fine-grained timestamps the ctime moves in clock ticks, so a change made
 * within the tick of the last mark would not show: a mount counts as unchanged only when
 * its ctime is as it was and nothing began within that tick.
 *
 * A writable root has two slots that take turns: the current one is the container's root,
 * the other holds a spare (a new overlay of the same layers over a new, empty upper tmpfs)
 * made while init is idle. A reset moves the container's mounts onto the spare and turns
 * to it; the old root and its upper are detached while idle too (a detach waits for an RCU
 * grace period, which the next run need not wait for).
 */
#ifndef SBX_SCRATCH_H
#define SBX_SCRATCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "mp.h"

struct mark {
    dev_t dev;             /* what a directory was after mounting (or the last reset) */
    int64_t ctime_ns;
};

struct tmpfs_mount {
    char *target;          /* inside the container */
    uint64_t size;
    unsigned int mode;
    uint64_t inodes;       /* 0: the kernel's default */
    unsigned long flags;   /* mount(2) flags */
    struct mark mark;
};

struct writable_root {
    char *lowerdir;        /* overlayfs's lowerdir=, the layers topmost first */
    uint64_t upper_size;
    char **carried;        /* the container's mounts moved onto a new root */
    int ncarried;
    char *slot_root[2], *slot_rw[2];
    char *slot_upper[2];   /* <slot_rw>/upper: overlayfs's upper layer */
    int current;
    int spare_ready;
    int old;               /* a slot whose root is still to be detached, or -1 */
    struct mark mark;      /* the current upper directory's */
};

struct scratch {
    struct tmpfs_mount *mounts;
    int n;
    int doubt;             /* something began within the tick of a mark */
    char *root;            /* the container's root in init's, for a read-only root */
    struct writable_root *writable;   /* NULL: the root is read-only */
    char *files;           /* the file cache's blobs in init's root; NULL: none bound */
    int *binds;            /* cached files bound into the root since the last reset: */
    int nbinds, binds_cap; /* their mounts, held open (each is found by its descriptor) */
};

/* From the config's "root", "files" (nil, or where the file cache's blobs are), "resettable" (an array of {target, size, mode, inodes, flags})
 * and "writable" (nil, or {lowers, skeleton, upper_size, carried, slots}), and their marks
 * as they are now; `skeleton`: the root was mounted with the skeleton layer over the lowers
 * (and so is every new one). 0, or -1 with `err` filled. */
int scratch_init(struct scratch *s, const struct mp_value *config, int skeleton, char *err,
                 size_t n);

/* Where the container's root is now, in init's root: where runs chroot, where paths are
 * opened for the host. */
const char *scratch_root(const struct scratch *s);

/* The writable root's current upper directory in init's root: what runs changed in the
 * root (files, whiteouts, opaque directories), where the host reads a commit's layer from;
 * NULL for a read-only root, which has none. */
const char *scratch_upper(const struct scratch *s);

/* A run starts, or a file is opened for the host: what it changes must show. */
void scratch_touching(struct scratch *s);

/* Mount the cached file `blob` (its name under `files`: checked by the caller) over the
 * regular file `target` (a descriptor: hostopen.h's open_mount_point), read-only, nosuid,
 * nodev, and noexec unless `exec`: no copy, whatever its size. The next reset undoes it
 * (the bind's mount is found by the descriptor kept, wherever a run moved its mount point).
 * 0; or, with errno set and `err` filled, SCRATCH_BLOB_FAILED when the blob could not be
 * taken (gone from the cache, or no cache in this container) and -1 when it could not be
 * mounted at `target`. */
#define SCRATCH_BLOB_FAILED (-2)
int scratch_bind(struct scratch *s, const char *blob, int target, int exec, char *err, size_t n);

/* If `target` (a descriptor) is a bind made since the last reset (a session binds the same
 * path again), undo it: 1 if so, 0 if not, -1 with `err` filled. */
int scratch_unbind_at(struct scratch *s, int target, char *err, size_t n);

/* Give back what may have changed, every bind included; 0, or -1 with `err` filled. */
int scratch_reset(struct scratch *s, char *err, size_t n);

/* Whether work for an idle moment is waiting, and doing it (detaching a writable root's
 * old slot, making its spare); 0, or -1 with `err` filled. */
int scratch_untidy(const struct scratch *s);
int scratch_tidy(struct scratch *s, char *err, size_t n);

#endif
