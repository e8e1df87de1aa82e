/*
 * Init's part of the container's mount plan (sandbox/runtime/rootfs.py): the plan's
 * operations from its proc mount on, which the helper cannot do (a proc mount shows the pid
 * namespace of whoever mounts it): proc, the masks and read-only parts, pivot_root.
 */
#ifndef SBX_MOUNTS_H
#define SBX_MOUNTS_H

#include <stddef.h>

#include "mp.h"

/* Carry out the config's "mounts" ([{op, target}], staging paths); 0, or -1 with `err`. */
int mounts_execute(const struct mp_value *ops, char *err, size_t n);

#endif
