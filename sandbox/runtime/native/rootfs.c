#define _GNU_SOURCE
#include "rootfs.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <linux/mount.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#define SAFE (MS_NOSUID | MS_NODEV)
/* A mount's options are one page: what does not fit is refused, never cut short. */
#define OPTIONS_MAX 4096

enum shape { SHAPE_DIR, SHAPE_ABSENT, SHAPE_OTHER };

static int fail(char *err, size_t n, const char *call, const char *what)
{
    int e = errno;
    snprintf(err, n, "[Errno %d] %s('%s'): %s", e, call, what, strerror(e));
    errno = e;
    return -1;
}

static int bad(char *err, size_t n, const char *what)
{
    snprintf(err, n, "%s", what);
    errno = EINVAL;
    return -1;
}

/* The str `key` of map `m` in `buf` (PATH_MAX): 0, or -1 (absent, not a str, a NUL in it,
 * too long). */
static int get_str(const struct mp_value *m, const char *key, char *buf)
{
    struct mp_value v;
    if (mp_get(m, key, &v) < 0 || v.type != MP_STR || v.len >= PATH_MAX ||
        memchr(v.data, 0, v.len))
        return -1;
    memcpy(buf, v.data, v.len);
    buf[v.len] = 0;
    return 0;
}

static int get_ulong(const struct mp_value *m, const char *key, unsigned long *out)
{
    struct mp_value v;
    int64_t x;
    if (mp_get(m, key, &v) < 0 || mp_int(&v, 0, INT64_MAX, &x) < 0)
        return -1;
    *out = (unsigned long)x;
    return 0;
}

unsigned long locked_mount_flags(const char *path)
{
    static const struct {
        unsigned long st, ms;
    } map[] = {{ST_RDONLY, MS_RDONLY},   {ST_NOSUID, MS_NOSUID},
               {ST_NODEV, MS_NODEV},     {ST_NOEXEC, MS_NOEXEC},
               {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME},
               {ST_RELATIME, MS_RELATIME}};
    struct statvfs sv;
    unsigned long out = 0;
    size_t i;
    if (statvfs(path, &sv) < 0)
        return 0;
    for (i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (sv.f_flag & map[i].st)
            out |= map[i].ms;
    return out;
}

/* A read-only, nosuid, nodev bind of a directory. Not recursive, so that mounts below the
 * directory on the host stay out of sight; the kernel refuses that (EINVAL) when such
 * mounts are locked (they came from a more privileged namespace and hide what is under
 * them), and then they come along, made read-only, nosuid and nodev with the rest. */
static int bind_read_only(const char *source, const char *target, char *err, size_t n)
{
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID |
                                          MOUNT_ATTR_NODEV};
    if (mount(source, target, NULL, MS_BIND, NULL) < 0) {
        if (errno != EINVAL)
            return fail(err, n, "mount bind", target);
        if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) < 0)
            return fail(err, n, "mount rbind", target);
    }
    if (syscall(SYS_mount_setattr, AT_FDCWD, target, AT_RECURSIVE, &attr, sizeof(attr)) < 0)
        return fail(err, n, "mount_setattr", target);
    return 0;
}

/* The next component of the path at *at ("a" of "/a/b"), its length in *k, and *at moved
 * past it; NULL at the end. */
static const char *component(const char **at, size_t *k)
{
    const char *part = *at;
    while (*part == '/')
        part++;
    if (!*part)
        return NULL;
    *at = strchrnul(part, '/');
    *k = (size_t)(*at - part);
    return part;
}

/* "/" and `part` appended to `path` (of PATH_MAX, `*len` long); -1 if it does not fit. */
static int append(char *path, size_t *len, const char *part, size_t k)
{
    if (*len + 1 + k >= PATH_MAX)
        return -1;
    path[(*len)++] = '/';
    memcpy(path + *len, part, k);
    path[*len += k] = 0;
    return 0;
}

/* "dir" when every component of `target` below `root` is a directory; "absent" when the
 * first that is not does not exist; "other" when it is a link or a file. */
static int shape_of(const char *root, const char *target, enum shape *out, char *err,
                    size_t n)
{
    char path[PATH_MAX];
    const char *at = target, *part;
    size_t len = strlen(root), k;
    struct stat st;

    if (len >= sizeof(path))
        return bad(err, n, "the root's path is too long");
    memcpy(path, root, len + 1);
    while ((part = component(&at, &k))) {
        if (append(path, &len, part, k) < 0)
            return bad(err, n, "a mount point's path is too long");
        if (lstat(path, &st) < 0) {
            if (errno != ENOENT)
                return fail(err, n, "lstat", path);
            *out = SHAPE_ABSENT;
            return 0;
        }
        if (!S_ISDIR(st.st_mode)) {
            *out = SHAPE_OTHER;
            return 0;
        }
    }
    *out = SHAPE_DIR;
    return 0;
}

/* Directories for `target` in a layer meant to go over the image's: an image directory on
 * the way keeps its mode and owner (the skeleton's copy is what the merged tree shows);
 * anything else becomes a plain 0755 directory, hiding a link or file. The image is looked
 * at only while every component so far is a real directory: past a link, a path would lead
 * wherever the image chose (the host, here). */
static int skeleton_dirs(const char *root, const char *target, const char *skeleton,
                         char *err, size_t n)
{
    char image[PATH_MAX], skel[PATH_MAX];
    size_t ilen = strlen(root), slen = strlen(skeleton), k;
    const char *at = target, *part;
    int look = 1;
    struct stat st, mine;

    if (ilen >= sizeof(image) || slen >= sizeof(skel))
        return bad(err, n, "the root's path is too long");
    if (mkdir(skeleton, 0755) < 0 && errno != EEXIST)
        return fail(err, n, "mkdir", skeleton);
    memcpy(image, root, ilen + 1);
    memcpy(skel, skeleton, slen + 1);
    while ((part = component(&at, &k))) {
        int have = 0;
        if (append(skel, &slen, part, k) < 0 || (look && append(image, &ilen, part, k) < 0))
            return bad(err, n, "a mount point's path is too long");
        if (look) {
            if (lstat(image, &st) == 0 && S_ISDIR(st.st_mode))
                have = 1;
            else
                look = 0;
        }
        if (stat(skel, &mine) == 0 && S_ISDIR(mine.st_mode))
            continue;
        if (mkdir(skel, 0755) < 0)
            return fail(err, n, "mkdir", skel);
        if (have) {
            if (chmod(skel, st.st_mode & 07777) < 0)
                return fail(err, n, "chmod", skel);
            /* An owner the user namespace does not map shows as the overflow id. */
            (void)!chown(skel, st.st_uid, st.st_gid);
        }
    }
    return 0;
}

static int write_file(const char *path, const struct mp_value *content, char *err, size_t n)
{
    size_t done = 0;
    ssize_t k;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return fail(err, n, "open", path);
    while (done < content->len) {
        k = write(fd, content->data + done, content->len - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            close(fd);
            return fail(err, n, "write", path);
        }
        done += (size_t)k;
    }
    if (fchmod(fd, 0644) < 0) {
        close(fd);
        return fail(err, n, "chmod", path);
    }
    close(fd);
    return 0;
}

/* E2BIG, not EINVAL: a root refused here is not retried without the skeleton (do_root),
 * as one the kernel refused for a locked lower layer is. */
static int too_long(char *err, size_t n)
{
    bad(err, n, "root: too many layers for one overlay mount");
    errno = E2BIG;
    return -1;
}

/* The root at `target`: a read-only bind of a single layer, or an overlay (read-only
 * without an upper). `top`, if not NULL, goes over `lowers` (overlayfs's order). */
static int mount_root(const char *target, const char *top, const struct mp_value *lowers,
                      const char *upper, const char *work, char *err, size_t n)
{
    char data[OPTIONS_MAX + 1], one[PATH_MAX];
    struct mp_value item;
    size_t len;
    uint32_t i;
    int k;

    if (!top && !upper && lowers->len == 1) {
        if (mp_item(lowers, 0, &item) < 0 || item.type != MP_STR || item.len >= PATH_MAX)
            return bad(err, n, "root: lowers must be paths");
        memcpy(one, item.data, item.len);
        one[item.len] = 0;
        return bind_read_only(one, target, err, n);
    }
    len = (size_t)snprintf(data, sizeof(data), "lowerdir=%s%s", top ? top : "", top ? ":" : "");
    if (len > OPTIONS_MAX)
        return too_long(err, n);
    for (i = 0; i < lowers->len; i++) {
        if (mp_item(lowers, i, &item) < 0 || item.type != MP_STR ||
            memchr(item.data, 0, item.len) || memchr(item.data, ':', item.len))
            return bad(err, n, "root: lowers must be paths");
        k = snprintf(data + len, sizeof(data) - len, "%s%.*s", i ? ":" : "", (int)item.len,
                     (const char *)item.data);
        if (k < 0 || (len += (size_t)k) > OPTIONS_MAX)
            return too_long(err, n);
    }
    if (upper)
        len += (size_t)snprintf(data + len, sizeof(data) - len, ",upperdir=%s,workdir=%s",
                                upper, work);
    if (len + sizeof(",userxattr") - 1 > OPTIONS_MAX)
        return too_long(err, n);
    strcat(data, ",userxattr");
    if (mount("overlay", target, "overlay", SAFE | (upper ? 0 : MS_RDONLY), data) < 0)
        return fail(err, n, "mount overlay", target);
    return 0;
}

/* The container's root, with a skeleton layer on top if the image lacks a mount point (found
 * by looking, so a shape the plan cannot know of is still served) or the runtime provides
 * files. Mount points the image lacks, or has as a symbolic link or a file, come from the
 * skeleton, as runc and podman make their own: an image's shape never keeps /proc, /dev or
 * /tmp from being mounted, and a mount never follows a link the image planted. A provided
 * file goes where the image's directory is a real one or absent: an image whose /etc is a
 * link or a file keeps its own shape. */
static int do_root(const struct mp_value *op, int *skeleton, char *err, size_t n)
{
    char target[PATH_MAX], upper[PATH_MAX], work[PATH_MAX], skel[PATH_MAX];
    char path[PATH_MAX], dir[PATH_MAX];
    struct mp_value lowers, points, provided, item, pair, content;
    int has_upper, missing = 0, wanted = 0;
    enum shape shape;
    uint32_t i;

    if (get_str(op, "target", target) < 0 || get_str(op, "skeleton", skel) < 0 ||
        mp_get(op, "lowers", &lowers) < 0 || lowers.type != MP_ARRAY || lowers.len == 0 ||
        mp_get(op, "mountpoints", &points) < 0 || points.type != MP_ARRAY ||
        mp_get(op, "provided", &provided) < 0 || provided.type != MP_ARRAY)
        return bad(err, n, "root: {target, lowers, upper, work, mountpoints, provided, "
                              "skeleton} expected");
    has_upper = get_str(op, "upper", upper) == 0;
    if (has_upper && get_str(op, "work", work) < 0)
        return bad(err, n, "root: an upper needs a work directory");
    *skeleton = 0;
    if (mount_root(target, NULL, &lowers, has_upper ? upper : NULL, work, err, n) < 0)
        return -1;

    for (i = 0; i < points.len; i++) {
        if (mp_item(&points, i, &item) < 0 || item.type != MP_STR || item.len >= PATH_MAX ||
            memchr(item.data, 0, item.len))
            return bad(err, n, "root: mountpoints must be paths");
        memcpy(path, item.data, item.len);
        path[item.len] = 0;
        if (shape_of(target, path, &shape, err, n) < 0)
            return -1;
        if (shape != SHAPE_DIR) {
            if (skeleton_dirs(target, path, skel, err, n) < 0)
                return -1;
            missing++;
        }
    }
    for (i = 0; i < provided.len; i++) {
        if (mp_item(&provided, i, &pair) < 0 || pair.type != MP_ARRAY || pair.len != 2 ||
            mp_item(&pair, 0, &item) < 0 || item.type != MP_STR || item.len >= PATH_MAX ||
            memchr(item.data, 0, item.len) || mp_item(&pair, 1, &content) < 0 ||
            !mp_is_bytes(&content))
            return bad(err, n, "root: provided must be [path, content] pairs");
        memcpy(path, item.data, item.len);
        path[item.len] = 0;
        memcpy(dir, path, item.len + 1);
        if (shape_of(target, dirname(dir), &shape, err, n) < 0)
            return -1;
        if (shape == SHAPE_OTHER)
            continue;
        memcpy(dir, path, item.len + 1);
        if (skeleton_dirs(target, dirname(dir), skel, err, n) < 0)
            return -1;
        if (snprintf(dir, sizeof(dir), "%s%s", skel, path) >= (int)sizeof(dir))
            return bad(err, n, "root: a provided file's path is too long");
        if (write_file(dir, &content, err, n) < 0)
            return -1;
        wanted++;
    }
    if (!missing && !wanted)
        return 0;
    if (umount2(target, MNT_DETACH) < 0)
        return fail(err, n, "umount2", target);
    if (mount_root(target, skel, &lowers, has_upper ? upper : NULL, work, err, n) == 0) {
        *skeleton = 1;
        return 0;
    }
    /* overlayfs takes no layer with mounts locked below it (a directory root with the
     * host's mounts under it, which only a bind can show): such a root goes without the
     * provided files, as it went before they were. */
    if (missing || errno != EINVAL)
        return -1;
    return mount_root(target, NULL, &lowers, has_upper ? upper : NULL, work, err, n);
}

static int one(const struct mp_value *op, const char *kind, const struct rootfs_layers *l,
               int *layer, int *skeleton, char *err, size_t n)
{
    char target[PATH_MAX], source[PATH_MAX], data[PATH_MAX], fstype[32];
    unsigned long flags = 0, mode = 0;
    struct mp_value v;
    struct stat st;
    int fd;

    if (strcmp(kind, "root") == 0)
        return do_root(op, skeleton, err, n);
    if (get_str(op, "target", target) < 0)
        return bad(err, n, "a target path expected");
    if (strcmp(kind, "mount") == 0) {
        if (get_str(op, "source", source) < 0 || get_str(op, "fstype", data) < 0 ||
            strlen(data) >= sizeof(fstype) || get_ulong(op, "flags", &flags) < 0)
            return bad(err, n, "mount: {source, fstype, target, flags, data} expected");
        strcpy(fstype, data);
        if (mp_get(op, "data", &v) < 0 || v.type == MP_NIL)
            data[0] = 0;
        else if (get_str(op, "data", data) < 0)
            return bad(err, n, "mount: data must be a str or nil");
        if (mount(source, target, fstype, flags, data[0] ? data : NULL) < 0)
            return fail(err, n, "mount", target);
    } else if (strcmp(kind, "mkdir") == 0) {
        if (get_ulong(op, "mode", &mode) < 0 || mp_get(op, "if_missing", &v) < 0 ||
            v.type != MP_BOOL)
            return bad(err, n, "mkdir: {target, mode, if_missing} expected");
        if (v.u && stat(target, &st) == 0 && S_ISDIR(st.st_mode))
            return 0;
        if (mkdir(target, (mode_t)mode) < 0)
            return fail(err, n, "mkdir", target);
    } else if (strcmp(kind, "layer") == 0) {
        if (*layer >= l->n)
            return bad(err, n, "layer: not opened");
        snprintf(source, sizeof(source), "/proc/self/fd/%d", l->fds[(*layer)++]);
        return bind_read_only(source, target, err, n);
    } else if (strcmp(kind, "bind") == 0) {
        if (get_str(op, "source", source) < 0 || get_ulong(op, "flags", &flags) < 0)
            return bad(err, n, "bind: {source, target, flags} expected");
        if (mount(source, target, NULL, MS_BIND, NULL) < 0)
            return fail(err, n, "mount bind", target);
        if (mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | flags | locked_mount_flags(target),
                  NULL) < 0)
            return fail(err, n, "remount bind", target);
    } else if (strcmp(kind, "remount") == 0) {
        if (get_ulong(op, "flags", &flags) < 0)
            return bad(err, n, "remount: {target, flags} expected");
        if (mount(NULL, target, NULL, MS_REMOUNT | flags, NULL) < 0)
            return fail(err, n, "remount", target);
    } else if (strcmp(kind, "touch") == 0) {
        if ((fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) < 0)
            return fail(err, n, "open", target);
        close(fd);
    } else if (strcmp(kind, "symlink") == 0) {
        if (get_str(op, "link_to", source) < 0)
            return bad(err, n, "symlink: {link_to, target} expected");
        if (symlink(source, target) < 0)
            return fail(err, n, "symlink", target);
    } else {
        return bad(err, n, "not an operation the helper does");
    }
    return 0;
}

/* The kind of operation `i`, in `kind`. */
static int kind_of(const struct mp_value *ops, uint32_t i, struct mp_value *op, char *kind,
                   size_t cap)
{
    struct mp_value v;
    if (mp_item(ops, i, op) < 0 || op->type != MP_MAP || mp_get(op, "op", &v) < 0 ||
        v.type != MP_STR || v.len >= cap)
        return -1;
    memcpy(kind, v.data, v.len);
    kind[v.len] = 0;
    return 0;
}

int rootfs_open_layers(const struct mp_value *ops, struct rootfs_layers *l, char *err,
                       size_t n)
{
    char kind[16], source[PATH_MAX];
    struct mp_value op;
    uint32_t i;

    if (ops->type != MP_ARRAY)
        return bad(err, n, "a list of operations expected");
    l->n = 0;
    if (!(l->fds = calloc(ops->len ? ops->len : 1, sizeof(int))))
        return fail(err, n, "calloc", "layers");
    for (i = 0; i < ops->len; i++) {
        if (kind_of(ops, i, &op, kind, sizeof(kind)) < 0 ||
            (strcmp(kind, "layer") == 0 && get_str(&op, "source", source) < 0)) {
            snprintf(err, n, "mount plan: operation %u: {op, ...} expected", i);
            return -1;
        }
        if (strcmp(kind, "layer") != 0)
            continue;
        if ((l->fds[l->n] = open(source, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0)
            return fail(err, n, "open", source);
        l->n++;
    }
    return 0;
}

int rootfs_execute(const struct mp_value *ops, const struct rootfs_layers *l, int *skeleton,
                   char *err, size_t n)
{
    char kind[16], why[PATH_MAX + 512];
    struct mp_value op;
    int layer = 0;
    uint32_t i;

    *skeleton = 0;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return fail(err, n, "mount private", "/");
    for (i = 0; i < ops->len; i++) {
        if (kind_of(ops, i, &op, kind, sizeof(kind)) < 0) {
            snprintf(err, n, "mount plan: operation %u: {op, ...} expected", i);
            return -1;
        }
        if (one(&op, kind, l, &layer, skeleton, why, sizeof(why)) < 0) {
            snprintf(err, n, "mount plan: operation %u (%s): %s", i, kind, why);
            return -1;
        }
    }
    return 0;
}
