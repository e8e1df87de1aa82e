/*
 * Paths of a container opened by its init for the host (copies in and out).
 *
 * Init does this inside the container's mount namespace, as container root; the host only
 * reads or writes the descriptor it gets back. Sandboxed code may have planted symlinks
 * anywhere and may swap directories at any moment, so no path is ever resolved through a
 * symlink: every component is resolved with openat2 RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS
 * and the last one is opened with O_NOFOLLOW. A path through a link is refused (ELOOP) with
 * a message naming the link and where it points; the caller gives the real path.
 *
 * Two kinds of request:
 * - "path": an absolute path inside the container ("/tmp/in.txt", "/" for the root);
 * - "entry" {dir, dev, ino, name}: an entry of a directory the host is walking. The host
 *   holds that directory open and names it by (st_dev, st_ino) and the path it was found
 *   at. Init opens the path again, proves it is still the same inode (the host's
 *   descriptor pins it, so the number cannot have been reused) and opens the entry from
 *   that descriptor with O_NOFOLLOW; a directory moved or replaced meanwhile is ESTALE,
 *   never another tree.
 *
 * With "owner" [uid, gid], missing parents are made (0755) and they and the file are given
 * to that owner, the file with "mode"; an existing file must be a regular file with no
 * other hard link (writing it would change the file under its other names too), and
 * O_TRUNC waits until that is checked. Files of kernel pseudo filesystems are refused
 * (EPERM) before anything is changed.
 */
#ifndef SBX_HOSTOPEN_H
#define SBX_HOSTOPEN_H

#include <stddef.h>

#include "mp.h"

struct failure {
    int err;               /* errno */
    char why[2048];        /* for the host's error message */
};

/* The descriptor opened for the open request `msg` in the container whose root is
 * `container_root` (a path in init's own root), or -1 with `f` filled. */
int open_for_host(const struct mp_value *msg, const char *container_root, struct failure *f);

#endif
