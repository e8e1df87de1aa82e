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
 *
 * Either is resolved against a "base": "root" (or none), the container's root as its
 * processes see it; or "upper", the upper directory of its writable root (overlayfs's
 * upper layer: what runs changed, with whiteouts and opaque directories as overlayfs keeps
 * them), with the same rules, for reading only (overlayfs's layers must not change under
 * the mounted overlay; EPERM otherwise). A read-only root has no upper directory: EROFS.
 * For a directory opened there, init tells whether it is opaque (user.overlay.opaque "y":
 * it hides what the layers below hold there): the host may not read the xattrs of a
 * directory that another container user owns, init may.
 */
#ifndef SBX_HOSTOPEN_H
#define SBX_HOSTOPEN_H

#include <stddef.h>
#include <sys/types.h>

#include "mp.h"

struct failure {
    int err;               /* errno */
    char why[2048];        /* for the host's error message */
};

/* Where requests are resolved, paths in init's own root. */
struct open_bases {
    const char *root;      /* the container's root */
    const char *upper;     /* its writable root's upper directory; NULL: the root is read-only */
};

/* The descriptor opened for the open request `msg`, or -1 with `f` filled. `*opaque` is
 * 1 or 0 for a directory opened under the base "upper" (whether it is opaque), else -1. */
int open_for_host(const struct mp_value *msg, const struct open_bases *bases, int *opaque,
                  struct failure *f);

/* A regular file at `path` (len bytes, inside the container) below `root` (in init's root),
 * to mount a cached file over: opened as a put opens it (every component without following
 * a link, missing parents made 0755 and given to `owner`), made empty and given to `owner`
 * when missing, never truncated. The descriptor, or -1 with `f` filled. */
int open_mount_point(const char *root, const char *path, size_t len, const uid_t owner[2],
                     struct failure *f);

#endif
