#define _GNU_SOURCE
#include "hostopen.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#define MAX_PARTS 256
#define DIR_FLAGS (O_PATH | O_DIRECTORY)

/* A path as its components; part[i] points into buf, each NUL-terminated. */
struct parts {
    char buf[PATH_MAX + 1];
    const char *part[MAX_PARTS + 1]; /* one more for the entry name */
    int n;
};

/* Kernel interfaces, not data: a host file opened or written there could reach init
 * itself (/proc/self/mem is a regular file) or the kernel's settings. */
static const struct {
    long magic;
    const char *name;
} pseudo_fs[] = {
    {0x9FA0, "procfs"},       {0x62656572, "sysfs"},      {0x1CD1, "devpts"},
    {0x27E0EB, "cgroup"},     {0x63677270, "cgroup2"},    {0x73636673, "securityfs"},
    {0x64626720, "debugfs"},  {0x74726163, "tracefs"},    {0xCAFE4A11, "bpf"},
};

static int fail(struct failure *f, int err, const char *fmt, ...)
{
    va_list ap;
    f->err = err;
    va_start(ap, fmt);
    vsnprintf(f->why, sizeof(f->why), fmt, ap);
    va_end(ap);
    return -1;
}

static int fail_errno(struct failure *f, int err)
{
    return fail(f, err, "%s", strerror(err));
}

/* Python's repr() of bytes (b'...') or of a str (quoted, escaped), as the messages of the
 * Python init that this replaces showed them. */
static void repr(char *out, size_t n, const char *s, size_t len, int as_bytes)
{
    char quote = memchr(s, '\'', len) && !memchr(s, '"', len) ? '"' : '\'';
    size_t o = 0, i;
#define PUT(c) do { if (o + 1 < n) out[o++] = (c); } while (0)
    if (as_bytes)
        PUT('b');
    PUT(quote);
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\\' || c == (unsigned char)quote) {
            PUT('\\');
            PUT((char)c);
        } else if (c == '\n' || c == '\r' || c == '\t') {
            PUT('\\');
            PUT(c == '\n' ? 'n' : c == '\r' ? 'r' : 't');
        } else if (c < 0x20 || c == 0x7f || (as_bytes && c >= 0x80)) {
            char hex[5];
            snprintf(hex, sizeof(hex), "\\x%02x", c);
            PUT(hex[0]); PUT(hex[1]); PUT(hex[2]); PUT(hex[3]);
        } else {
            PUT((char)c);
        }
    }
    PUT(quote);
    out[o] = 0;
#undef PUT
}

/* Split `path` (len bytes) into components, dropping empty ones and "."; ".." is refused. */
static int components(const char *path, size_t len, struct parts *p, struct failure *f)
{
    size_t i = 0, start;
    char shown[PATH_MAX * 4 + 8];

    p->n = 0;
    if (memchr(path, 0, len))
        return fail(f, EINVAL, "the path contains a NUL byte");
    if (len > PATH_MAX)
        return fail(f, ENAMETOOLONG, "%s", strerror(ENAMETOOLONG));
    memcpy(p->buf, path, len);
    p->buf[len] = 0;
    while (i < len) {
        while (i < len && p->buf[i] == '/')
            p->buf[i++] = 0;
        start = i;
        while (i < len && p->buf[i] != '/')
            i++;
        if (i > start) {
            p->buf[i] = 0;
            if (strcmp(p->buf + start, "..") == 0) {
                repr(shown, sizeof(shown), path, len, 1);
                return fail(f, EINVAL, "%s: '..' is not allowed", shown);
            }
            if (strcmp(p->buf + start, ".") == 0)
                continue;
            if (p->n == MAX_PARTS)
                return fail(f, ENAMETOOLONG, "%s", strerror(ENAMETOOLONG));
            p->part[p->n++] = p->buf + start;
        }
        i++;
    }
    return 0;
}

/* The first `k` components joined by "/" ("" for none). */
static void join(const struct parts *p, int k, char *out, size_t n)
{
    size_t o = 0;
    int i;
    out[0] = 0;
    for (i = 0; i < k; i++)
        o += (size_t)snprintf(out + o, o < n ? n - o : 0, "%s%s", i ? "/" : "", p->part[i]);
}

/* openat2 inside the container's root: no symlink, no magic link, mounts crossed. */
static int open_in(int dirfd, const char *rel, int flags, mode_t mode)
{
    struct open_how how;
    int i, fd = -1;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.mode = flags & O_CREAT ? mode : 0;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS;
    for (i = 0; i < 16; i++) {
        fd = (int)syscall(SYS_openat2, dirfd, *rel ? rel : ".", &how, sizeof(how));
        /* EAGAIN: a concurrent rename or mount made the kernel unsure `..` stayed inside. */
        if (fd >= 0 || (errno != EAGAIN && errno != EINTR))
            break;
    }
    return fd;
}

/* ELOOP naming the first symlink on the way to the first `k` parts (a /proc magic link
 * is one). */
static int link_error(int root, const struct parts *p, int k, const char *shown,
                      struct failure *f)
{
    char rel[PATH_MAX + 1], target[PATH_MAX + 1], shown_target[PATH_MAX * 4 + 8];
    struct stat st;
    int i, fd;
    ssize_t len;

    for (i = 1; i <= k; i++) {
        join(p, i, rel, sizeof(rel));
        if ((fd = open_in(root, rel, O_PATH | O_NOFOLLOW, 0)) < 0)
            break;
        if (fstat(fd, &st) == 0 && S_ISLNK(st.st_mode)) {
            len = readlinkat(fd, "", target, sizeof(target) - 1);
            close(fd);
            repr(shown_target, sizeof(shown_target), target, len > 0 ? (size_t)len : 0, 0);
            if (strcmp(rel, shown + 1) == 0)
                return fail(f, ELOOP, "%s is a symbolic link (-> %s); copies never follow "
                            "symbolic links: give the real path", shown, shown_target);
            return fail(f, ELOOP, "%s passes through the symbolic link /%s (-> %s); copies "
                        "never follow symbolic links: give the real path", shown, rel,
                        shown_target);
        }
        close(fd);
    }
    return fail(f, ELOOP, "%s: a symbolic link on the way changed while it was opened; "
                "copies never follow symbolic links: give the real path", shown);
}

/* Made meanwhile, or a link was planted there: the open below refuses the link. Only a
 * directory this init made is handed over: one swapped in since the mkdir is someone
 * else's, and its owner stays. */
static int make_dir(int parent, const char *name, const uid_t owner[2])
{
    struct stat st;
    int fd, out;
    if (mkdirat(parent, name, 0700) < 0 && errno != EEXIST)
        return -1;
    if ((fd = open_in(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0)) < 0)
        return -1;
    if (fstat(fd, &st) < 0 ||
        (st.st_uid == geteuid() && (fchown(fd, owner[0], owner[1]) < 0 ||
                                    fchmod(fd, 0755) < 0))) {
        close(fd);
        return -1;
    }
    out = openat(fd, ".", DIR_FLAGS | O_CLOEXEC);
    close(fd);
    return out;
}

/* An O_PATH descriptor of the directory of the first `k` parts, making what is missing
 * (0755, given to `owner`) when `owner` is set. Never through a symlink, never creating
 * through one. */
static int walk(int root, const struct parts *p, int k, const uid_t *owner, const char *shown,
                struct failure *f)
{
    char rel[PATH_MAX + 1];
    int fd, nfd, i;

    join(p, k, rel, sizeof(rel));
    if ((fd = open_in(root, rel, DIR_FLAGS, 0)) >= 0)
        return fd;
    if (errno == ELOOP)
        return link_error(root, p, k, shown, f);
    if (errno != ENOENT || owner == NULL)
        return fail_errno(f, errno);
    if ((fd = fcntl(root, F_DUPFD_CLOEXEC, 0)) < 0)
        return fail_errno(f, errno);
    for (i = 0; i < k; i++) {
        nfd = open_in(fd, p->part[i], DIR_FLAGS, 0);
        if (nfd < 0 && errno == ENOENT)
            nfd = make_dir(fd, p->part[i], owner);
        if (nfd < 0) {
            int err = errno;
            close(fd);
            if (err == ELOOP)
                return link_error(root, p, i + 1, shown, f);
            return fail_errno(f, err);
        }
        close(fd);
        fd = nfd;
    }
    return fd;
}

/* Open `name` in `parent`; with O_CREAT, an existing entry is opened without it and a new
 * one made with O_EXCL: on someone else's link in a sticky directory (/tmp) O_CREAT gets
 * EACCES (the kernel's rule for creating in sticky directories) before O_NOFOLLOW gets the
 * ELOOP that lets the error name the link. `*made`: whether it made the file. -1 with
 * errno. */
static int open_entry(int parent, const char *name, int flags, int *made)
{
    int i, fd;
    *made = 0;
    if (!(flags & O_CREAT))
        return open_in(parent, name, flags, 0);
    for (i = 0; i < 8; i++) {
        if ((fd = open_in(parent, name, flags & ~O_CREAT, 0)) >= 0 || errno != ENOENT)
            return fd;
        if ((fd = open_in(parent, name, flags | O_EXCL, 0600)) >= 0 || errno != EEXIST) {
            *made = fd >= 0;
            return fd;
        }
        /* made meanwhile: open that one */
    }
    errno = EAGAIN;
    return -1;
}

/* The checks and changes on the opened file; 0, or -1 with `f` filled. */
static int finish(int fd, const char *shown, int flags, const uid_t *owner, mode_t mode,
                  struct failure *f)
{
    struct statfs sfs;
    struct stat st;
    size_t i;

    if (fstatfs(fd, &sfs) < 0)
        return fail_errno(f, errno);
    for (i = 0; i < sizeof(pseudo_fs) / sizeof(pseudo_fs[0]); i++)
        if ((long)sfs.f_type == pseudo_fs[i].magic)
            return fail(f, EPERM, "%s is on %s, a kernel interface", shown, pseudo_fs[i].name);
    if (owner != NULL) {
        if (fstat(fd, &st) < 0)
            return fail_errno(f, errno);
        if (!S_ISREG(st.st_mode))
            return fail(f, EINVAL, "%s is not a regular file", shown);
        if (st.st_nlink > 1)
            return fail(f, EMLINK, "%s has %lu hard links; writing it would change the file "
                        "under its other names too: remove it first, then copy again", shown,
                        (unsigned long)st.st_nlink);
        if (fchown(fd, owner[0], owner[1]) < 0 || fchmod(fd, mode & 0777) < 0)
            return fail_errno(f, errno);
    }
    if ((flags & O_TRUNC) && ftruncate(fd, 0) < 0)
        return fail_errno(f, errno);
    return 0;
}

/* Whether `fd`, opened in the upper directory, is an opaque directory: `*opaque` is 1 or
 * 0, or -1 for anything but a directory. 0, or -1 with `f` filled. */
static int opacity(int fd, int *opaque, struct failure *f)
{
    struct stat st;
    char value[2];
    ssize_t n;
    int rfd;

    if (fstat(fd, &st) < 0)
        return fail_errno(f, errno);
    *opaque = -1;
    if (!S_ISDIR(st.st_mode))
        return 0;
    n = fgetxattr(fd, "user.overlay.opaque", value, sizeof(value));
    if (n < 0 && errno == EBADF) {
        /* An O_PATH descriptor has no xattrs to read: the same directory, opened to read. */
        if ((rfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
            return fail_errno(f, errno);
        n = fgetxattr(rfd, "user.overlay.opaque", value, sizeof(value));
        close(rfd);
    }
    /* Only "y" is opaque; ERANGE is a longer value, which is not "y" either. */
    if (n < 0 && errno != ENODATA && errno != ENOTSUP && errno != ERANGE)
        return fail_errno(f, errno);
    *opaque = n == 1 && value[0] == 'y';
    return 0;
}

int open_for_host(const struct mp_value *msg, const struct open_bases *bases, int *opaque,
                  struct failure *f)
{
    struct parts p;
    struct mp_value v, entry, path;
    uid_t owner_ids[2];
    const uid_t *owner = NULL;
    const char *name = NULL;
    char shown[PATH_MAX + 2], namebuf[NAME_MAX + 1];
    int64_t flags, mode = 0644, x, dev = 0, ino = 0;
    int has_entry, in_upper = 0, root, parent, fd, made;
    struct stat st;

    *opaque = -1;

    if (mp_get(msg, "flags", &v) < 0 || mp_int(&v, INT32_MIN, INT32_MAX, &flags) < 0)
        return fail(f, EINVAL, "bad open request: 'flags' must be an int");
    if (mp_get(msg, "owner", &v) == 0 && v.type != MP_NIL) {
        struct mp_value id;
        int i;
        if (v.type != MP_ARRAY || v.len != 2)
            return fail(f, EINVAL, "bad open request: 'owner' must be [uid, gid]");
        for (i = 0; i < 2; i++) {
            if (mp_item(&v, (uint32_t)i, &id) < 0 || mp_int(&id, 0, UINT32_MAX, &x) < 0)
                return fail(f, EINVAL, "bad open request: 'owner' must be [uid, gid]");
            owner_ids[i] = (uid_t)x;
        }
        owner = owner_ids;
    }
    if (mp_get(msg, "mode", &v) == 0 && v.type != MP_NIL &&
        mp_int(&v, 0, 07777, &mode) < 0)
        return fail(f, EINVAL, "bad open request: 'mode' must be a file mode");
    if (mp_get(msg, "base", &v) == 0 && v.type != MP_NIL) {
        if (v.type == MP_STR && v.len == 5 && memcmp(v.data, "upper", 5) == 0)
            in_upper = 1;
        else if (v.type != MP_STR || v.len != 4 || memcmp(v.data, "root", 4) != 0)
            return fail(f, EINVAL, "bad open request: 'base' must be 'root' or 'upper'");
    }
    if (in_upper && bases->upper == NULL)
        return fail(f, EROFS, "the container's root is read-only: it has no upper layer, and "
                    "no run can have changed it");
    /* Overlayfs's layers must not change under the mounted overlay: its upper is read. */
    if (in_upper && (owner != NULL || (flags & O_ACCMODE) != O_RDONLY ||
                     (flags & (O_CREAT | O_TRUNC | O_APPEND)) ||
                     (flags & O_TMPFILE) == O_TMPFILE))
        return fail(f, EPERM, "the upper layer of a writable root is opened for reading only");
    has_entry = mp_get(msg, "entry", &entry) == 0 && entry.type != MP_NIL;
    if (has_entry) {
        struct mp_value dir, nm, d, i;
        char shown_name[NAME_MAX * 4 + 8];
        if (mp_get(&entry, "dir", &dir) < 0 || !mp_is_bytes(&dir) ||
            mp_get(&entry, "name", &nm) < 0 || !mp_is_bytes(&nm) ||
            mp_get(&entry, "dev", &d) < 0 || mp_int(&d, 0, INT64_MAX, &dev) < 0 ||
            mp_get(&entry, "ino", &i) < 0 || mp_int(&i, 0, INT64_MAX, &ino) < 0)
            return fail(f, EINVAL, "bad open request: 'entry' must be {dir, dev, ino, name}");
        /* The name of one entry: neither empty, ".", ".." nor holding "/" or NUL. */
        if (nm.len == 0 || nm.len > NAME_MAX || memchr(nm.data, '/', nm.len) ||
            memchr(nm.data, 0, nm.len) || (nm.len == 1 && nm.data[0] == '.') ||
            (nm.len == 2 && nm.data[0] == '.' && nm.data[1] == '.')) {
            repr(shown_name, sizeof(shown_name), (const char *)nm.data,
                 nm.len < NAME_MAX ? nm.len : NAME_MAX, 1);
            return fail(f, EINVAL, "%s is not the name of a directory entry", shown_name);
        }
        memcpy(namebuf, nm.data, nm.len);
        namebuf[nm.len] = 0;
        name = namebuf;
        if (components((const char *)dir.data, dir.len, &p, f) < 0)
            return -1;
    } else {
        if (mp_get(msg, "path", &path) < 0 || !mp_is_bytes(&path))
            return fail(f, EINVAL, "bad open request: give 'path' or 'entry'");
        if (components((const char *)path.data, path.len, &p, f) < 0)
            return -1;
    }
    if (!has_entry && p.n > 0)
        name = p.part[--p.n];
    join(&p, p.n, shown + 1, sizeof(shown) - 1);
    shown[0] = '/';
    if (name)
        snprintf(shown + strlen(shown), sizeof(shown) - strlen(shown), "%s%s",
                 p.n ? "/" : "", name);

    if ((root = open(in_upper ? bases->upper : bases->root, DIR_FLAGS | O_CLOEXEC)) < 0)
        return fail_errno(f, errno);
    parent = walk(root, &p, p.n, has_entry || !name ? NULL : owner, shown, f);
    if (parent < 0) {
        close(root);
        return -1;
    }
    if (has_entry && (fstat(parent, &st) < 0 || (int64_t)st.st_dev != dev ||
                      (int64_t)st.st_ino != ino)) {
        close(parent);
        close(root);
        return fail(f, ESTALE, "%s: its directory was moved or replaced", shown);
    }
    if (name == NULL)
        fd = openat(parent, ".", ((int)flags & ~O_CREAT) | O_CLOEXEC);
    else
        fd = open_entry(parent, name, ((int)flags & ~O_TRUNC) | O_NOFOLLOW, &made);
    close(parent);
    if (fd < 0) {
        int err = errno;
        if (err == ELOOP && name != NULL) {
            p.part[p.n] = name;
            link_error(root, &p, p.n + 1, shown, f);
        } else if (err == EAGAIN && name != NULL && (flags & O_CREAT)) {
            fail(f, EAGAIN, "%s kept appearing and vanishing", name);
        } else {
            fail_errno(f, err);
        }
        close(root);
        return -1;
    }
    close(root);
    if (finish(fd, shown, (int)flags, owner, (mode_t)mode, f) < 0 ||
        (in_upper && opacity(fd, opaque, f) < 0)) {
        close(fd);
        return -1;
    }
    return fd;
}

int open_mount_point(const char *root_path, const char *path, size_t len, const uid_t owner[2],
                     struct failure *f)
{
    struct parts p;
    struct stat st;
    char shown[PATH_MAX + 2];
    const char *name;
    int root, parent, fd, made;

    if (components(path, len, &p, f) < 0)
        return -1;
    if (p.n == 0)
        return fail(f, EISDIR, "/ is a directory; give the path of a file");
    name = p.part[--p.n];
    join(&p, p.n, shown + 1, sizeof(shown) - 1);
    shown[0] = '/';
    snprintf(shown + strlen(shown), sizeof(shown) - strlen(shown), "%s%s", p.n ? "/" : "",
             name);
    if ((root = open(root_path, DIR_FLAGS | O_CLOEXEC)) < 0)
        return fail_errno(f, errno);
    if ((parent = walk(root, &p, p.n, owner, shown, f)) < 0) {
        close(root);
        return -1;
    }
    /* Non-blocking: an existing FIFO there opens at once, and is refused below. */
    fd = open_entry(parent, name, O_RDONLY | O_CREAT | O_NONBLOCK | O_NOCTTY | O_NOFOLLOW,
                    &made);
    close(parent);
    if (fd < 0) {
        int err = errno;
        if (err == ELOOP) {
            p.part[p.n] = name;
            link_error(root, &p, p.n + 1, shown, f);
        } else {
            fail_errno(f, err);
        }
        close(root);
        return -1;
    }
    close(root);
    if (finish(fd, shown, O_RDONLY, NULL, 0, f) < 0)
        goto bad;
    if (fstat(fd, &st) < 0) {
        fail_errno(f, errno);
        goto bad;
    }
    if (!S_ISREG(st.st_mode)) {
        fail(f, EINVAL, "%s is not a regular file", shown);
        goto bad;
    }
    /* Made just now: the run user's, as a put makes it. An existing file (the image's, a
     * run's, a bind's) stays as it is. */
    if (made && (fchown(fd, owner[0], owner[1]) < 0 || fchmod(fd, 0644) < 0)) {
        fail_errno(f, errno);
        goto bad;
    }
    return fd;
bad:
    close(fd);
    return -1;
}
