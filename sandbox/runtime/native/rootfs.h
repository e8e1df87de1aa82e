/*
 * The helper's part of a container's mount plan (sandbox/runtime/rootfs.py plans it on the
 * host): every operation before the proc mount, carried out in the helper's new mount
 * namespace as root of its user namespace. Init does the rest (mounts.h).
 *
 * Operations ({op, ...}, paths already joined to the staging mount):
 *   mount {source, fstype, target, flags, data}      a new filesystem (tmpfs, sysfs, devpts)
 *   mkdir {target, mode, if_missing}
 *   layer {source, target}     a host directory bound read-only (a layer, the file cache)
 *   root {target, lowers, upper, work, mountpoints, provided, skeleton}   the container's
 *                              root, with the skeleton layer on top where needed
 *   bind {source, target, flags}    a bind remounted with `flags` (and the locked ones)
 *   remount {target, flags}
 *   touch {target}
 *   symlink {link_to, target}
 */
#ifndef SBX_ROOTFS_H
#define SBX_ROOTFS_H

#include <stddef.h>

#include "mp.h"

struct rootfs_layers {
    int *fds;              /* O_PATH descriptors of the layer ops' sources, in plan order */
    int n;
};

/* Open the sources of the plan's layer ops, while the helper still has the service's own
 * host id (container root's may not traverse the directories on the way). 0, or -1 with
 * `err` filled. */
int rootfs_open_layers(const struct mp_value *ops, struct rootfs_layers *l, char *err,
                       size_t n);

/* Carry out `ops`. `*skeleton` says whether the root was mounted with its skeleton layer on
 * top (a writable root's reset mounts it the same way). 0, or -1 with `err` filled. */
int rootfs_execute(const struct mp_value *ops, const struct rootfs_layers *l, int *skeleton,
                   char *err, size_t n);

/* The flags of the mount holding `path` that a remount inside a user namespace must keep
 * (the kernel "locks" them); 0 if it cannot be looked at. */
unsigned long locked_mount_flags(const char *path);

#endif
