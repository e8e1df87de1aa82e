#define _GNU_SOURCE
#include "scratch.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SAFE (MS_NOSUID | MS_NODEV)
#define LOWERDIR_MAX 4096

static int fail(char *err, size_t n, const char *call, const char *what)
{
    snprintf(err, n, "[Errno %d] %s('%s'): %s", errno, call, what, strerror(errno));
    return -1;
}

static char *str_of(const struct mp_value *v)
{
    if (v->type != MP_STR || memchr(v->data, 0, v->len))
        return NULL;
    return strndup((const char *)v->data, v->len);
}

/* `root` + `target` ("/" + "tmp"...), in `buf` of PATH_MAX. */
static const char *join(char *buf, const char *root, const char *target)
{
    snprintf(buf, PATH_MAX, "%s%s", root, strcmp(target, "/") ? target : "");
    return buf;
}

static int read_mark(const char *path, struct mark *m, char *err, size_t n)
{
    struct stat st;
    if (lstat(path, &st) < 0)
        return fail(err, n, "stat", path);
    m->dev = st.st_dev;
    m->ctime_ns = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
    return 0;
}

const char *scratch_root(const struct scratch *s)
{
    const struct writable_root *w = s->writable;
    return w ? w->slot_root[w->current] : s->root;
}

const char *scratch_upper(const struct scratch *s)
{
    const struct writable_root *w = s->writable;
    return w ? w->slot_upper[w->current] : NULL;
}

static int read_marks(struct scratch *s, char *err, size_t n)
{
    char path[PATH_MAX];
    int i;
    for (i = 0; i < s->n; i++)
        if (read_mark(join(path, scratch_root(s), s->mounts[i].target), &s->mounts[i].mark,
                      err, n) < 0)
            return -1;
    if (s->writable && read_mark(scratch_upper(s), &s->writable->mark, err, n) < 0)
        return -1;
    return 0;
}

static int init_tmpfs(struct scratch *s, const struct mp_value *list, char *err, size_t n)
{
    struct mp_value item, v;
    int64_t x;
    uint32_t i;

    if (list->type != MP_ARRAY || !(s->mounts = calloc(list->len + 1, sizeof(*s->mounts)))) {
        snprintf(err, n, "resettable: a list of tmpfs mounts expected");
        return -1;
    }
    for (i = 0; i < list->len; i++) {
        struct tmpfs_mount *m = &s->mounts[i];
        if (mp_item(list, i, &item) < 0 || mp_get(&item, "target", &v) < 0 ||
            !(m->target = str_of(&v)))
            goto bad;
        if (mp_get(&item, "size", &v) < 0 || mp_int(&v, 0, INT64_MAX, &x) < 0)
            goto bad;
        m->size = (uint64_t)x;
        if (mp_get(&item, "mode", &v) < 0 || mp_int(&v, 0, 07777, &x) < 0)
            goto bad;
        m->mode = (unsigned int)x;
        if (mp_get(&item, "inodes", &v) == 0 && v.type != MP_NIL) {
            if (mp_int(&v, 0, INT64_MAX, &x) < 0)
                goto bad;
            m->inodes = (uint64_t)x;
        }
        if (mp_get(&item, "flags", &v) < 0 || mp_int(&v, 0, UINT32_MAX, &x) < 0)
            goto bad;
        m->flags = (unsigned long)x;
        s->n++;
    }
    return 0;
bad:
    snprintf(err, n, "resettable: item %u is not a tmpfs mount {target, size, mode, inodes, "
             "flags}", i);
    return -1;
}

static int init_writable(struct scratch *s, const struct mp_value *wv, int skeleton,
                         char *err, size_t n)
{
    struct writable_root *w;
    struct mp_value v, item, pair;
    size_t len = 0;
    int64_t x;
    uint32_t i;

    if (!(w = s->writable = calloc(1, sizeof(*w))))
        goto bad;
    w->old = -1;
    if (mp_get(wv, "lowers", &v) < 0 || v.type != MP_ARRAY || v.len == 0)
        goto bad;
    /* A mount's options are one page: what does not fit is refused, never cut short. */
    if (!(w->lowerdir = calloc(1, LOWERDIR_MAX)))
        goto bad;
    if (skeleton) {
        char *top = NULL;
        if (mp_get(wv, "skeleton", &item) < 0 || !(top = str_of(&item)) || strchr(top, ':')) {
            free(top);
            goto bad;
        }
        len = (size_t)snprintf(w->lowerdir, LOWERDIR_MAX, "%s:", top);
        free(top);
        if (len >= LOWERDIR_MAX)
            goto bad;
    }
    for (i = 0; i < v.len; i++) {
        char *one;
        int k;
        if (mp_item(&v, i, &item) < 0 || !(one = str_of(&item)) || strchr(one, ':')) {
            free(one);
            goto bad;
        }
        k = snprintf(w->lowerdir + len, LOWERDIR_MAX - len, "%s%s", i ? ":" : "", one);
        free(one);
        if (k < 0 || (size_t)k >= LOWERDIR_MAX - len)
            goto bad;
        len += (size_t)k;
    }
    if (mp_get(wv, "upper_size", &v) < 0 || mp_int(&v, 1, INT64_MAX, &x) < 0)
        goto bad;
    w->upper_size = (uint64_t)x;
    if (mp_get(wv, "carried", &v) < 0 || v.type != MP_ARRAY ||
        !(w->carried = calloc(v.len + 1, sizeof(char *))))
        goto bad;
    for (i = 0; i < v.len; i++) {
        if (mp_item(&v, i, &item) < 0 || !(w->carried[i] = str_of(&item)))
            goto bad;
        w->ncarried++;
    }
    if (mp_get(wv, "slots", &v) < 0 || v.type != MP_ARRAY || v.len != 2)
        goto bad;
    for (i = 0; i < 2; i++)
        if (mp_item(&v, i, &pair) < 0 || pair.type != MP_ARRAY || pair.len != 2 ||
            mp_item(&pair, 0, &item) < 0 || !(w->slot_root[i] = str_of(&item)) ||
            mp_item(&pair, 1, &item) < 0 || !(w->slot_rw[i] = str_of(&item)) ||
            asprintf(&w->slot_upper[i], "%s/upper", w->slot_rw[i]) < 0)
            goto bad;
    return 0;
bad:
    snprintf(err, n, "writable: {lowers, skeleton, upper_size, carried, slots} expected");
    return -1;
}

int scratch_init(struct scratch *s, const struct mp_value *config, int skeleton, char *err,
                 size_t n)
{
    struct mp_value v;

    memset(s, 0, sizeof(*s));
    if (mp_get(config, "root", &v) < 0 || !(s->root = str_of(&v))) {
        snprintf(err, n, "root: the container's root in init's is missing");
        return -1;
    }
    if (mp_get(config, "files", &v) == 0 && v.type != MP_NIL && !(s->files = str_of(&v))) {
        snprintf(err, n, "files: where the file cache's blobs are in init's root, or nil");
        return -1;
    }
    if (mp_get(config, "resettable", &v) < 0 || init_tmpfs(s, &v, err, n) < 0)
        return -1;
    if (mp_get(config, "writable", &v) == 0 && v.type != MP_NIL &&
        init_writable(s, &v, skeleton, err, n) < 0)
        return -1;
    return read_marks(s, err, n);
}

void scratch_touching(struct scratch *s)
{
    struct timespec now;
    int64_t newest = s->writable ? s->writable->mark.ctime_ns : 0, t;
    int i;
    for (i = 0; i < s->n; i++)
        if (s->mounts[i].mark.ctime_ns > newest)
            newest = s->mounts[i].mark.ctime_ns;
    /* The clock inode times are taken from. */
    clock_gettime(CLOCK_REALTIME_COARSE, &now);
    t = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    if (t <= newest)
        s->doubt = 1;
}

/* Owned by container root whoever mounts it: init runs under an id of its own by now. */
static int mount_tmpfs(const char *path, uint64_t size, unsigned int mode, uint64_t inodes,
                       unsigned long flags, char *err, size_t n)
{
    char data[128];
    int len = snprintf(data, sizeof(data), "size=%llu,mode=%o,uid=0,gid=0",
                       (unsigned long long)size, mode);
    if (inodes)
        snprintf(data + len, sizeof(data) - (size_t)len, ",nr_inodes=%llu",
                 (unsigned long long)inodes);
    if (mount("tmpfs", path, "tmpfs", flags, data) < 0) {
        snprintf(err, n, "[Errno %d] mount('tmpfs', '%s', 'tmpfs', %#lx, '%s'): %s", errno,
                 path, flags, data, strerror(errno));
        return -1;
    }
    return 0;
}

static int changed(const struct scratch *s, const char *path, const struct mark *was,
                   char *err, size_t n, int *result)
{
    struct mark now;
    if (read_mark(path, &now, err, n) < 0)
        return -1;
    *result = s->doubt || now.dev != was->dev || now.ctime_ns != was->ctime_ns;
    return 0;
}

int scratch_untidy(const struct scratch *s)
{
    return s->writable && (s->writable->old >= 0 || !s->writable->spare_ready);
}

int scratch_tidy(struct scratch *s, char *err, size_t n)
{
    struct writable_root *w = s->writable;
    char path[PATH_MAX], data[LOWERDIR_MAX + 2 * PATH_MAX];
    int spare;

    if (!w)
        return 0;
    spare = 1 - w->current;
    if (w->old >= 0) {
        if (umount2(w->slot_root[spare], MNT_DETACH) < 0)
            return fail(err, n, "umount2", w->slot_root[spare]);
        if (umount2(w->slot_rw[spare], MNT_DETACH) < 0)
            return fail(err, n, "umount2", w->slot_rw[spare]);
        w->old = -1;
    }
    if (!w->spare_ready) {
        if (mount_tmpfs(w->slot_rw[spare], w->upper_size, 0755, 0, SAFE, err, n) < 0)
            return -1;
        snprintf(path, sizeof(path), "%s/work", w->slot_rw[spare]);
        if (mkdir(path, 0755) < 0)
            return fail(err, n, "mkdir", path);
        if (mkdir(w->slot_upper[spare], 0755) < 0)
            return fail(err, n, "mkdir", w->slot_upper[spare]);
        /* The merged root takes the upper directory's owner: container root's, as when the
         * container was made (init runs under an id of its own by now). */
        if (chown(w->slot_upper[spare], 0, 0) < 0)
            return fail(err, n, "chown", w->slot_upper[spare]);
        if ((size_t)snprintf(data, sizeof(data),
                             "lowerdir=%s,upperdir=%s,workdir=%s/work,userxattr", w->lowerdir,
                             w->slot_upper[spare], w->slot_rw[spare]) >= sizeof(data)) {
            snprintf(err, n, "the overlay's options are over %zu bytes", sizeof(data));
            return -1;
        }
        if (mount("overlay", w->slot_root[spare], "overlay", SAFE, data) < 0)
            return fail(err, n, "mount overlay", w->slot_root[spare]);
        w->spare_ready = 1;
    }
    return 0;
}

/* Move the container's mounts onto the spare root and turn to it. */
static int replace_root(struct scratch *s, char *err, size_t n)
{
    struct writable_root *w = s->writable;
    char from[PATH_MAX], to[PATH_MAX];
    int i, spare;

    if (scratch_untidy(s) && scratch_tidy(s, err, n) < 0)
        return -1;
    spare = 1 - w->current;
    for (i = 0; i < w->ncarried; i++) {
        join(from, w->slot_root[w->current], w->carried[i]);
        join(to, w->slot_root[spare], w->carried[i]);
        if (mount(from, to, NULL, MS_MOVE, NULL) < 0)
            return fail(err, n, "move mount", from);
    }
    w->old = w->current;
    w->current = spare;
    w->spare_ready = 0;
    return 0;
}

int scratch_bind(struct scratch *s, const char *blob, int target, int exec, char *err, size_t n)
{
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID |
                                          MOUNT_ATTR_NODEV | (exec ? 0 : MOUNT_ATTR_NOEXEC)};
    char src[PATH_MAX];
    int tree, saved;

    if (!s->files) {
        errno = ENOTSUP;
        snprintf(err, n, "this container was made without the file cache's blobs");
        return SCRATCH_BLOB_FAILED;
    }
    if (s->nbinds == s->binds_cap) {
        int cap = s->binds_cap ? s->binds_cap * 2 : 8;
        int *more = realloc(s->binds, sizeof(int) * (size_t)cap);
        if (!more)
            return fail(err, n, "realloc", "binds");
        s->binds = more;
        s->binds_cap = cap;
    }
    snprintf(src, sizeof(src), "%s/%s", s->files, blob);
    /* A detached copy of the blob's mount, its flags set before anyone can reach it. */
    tree = (int)open_tree(AT_FDCWD, src, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC |
                                         AT_SYMLINK_NOFOLLOW);
    if (tree < 0) {
        fail(err, n, "open_tree", src);
        return SCRATCH_BLOB_FAILED;
    }
    if (mount_setattr(tree, "", AT_EMPTY_PATH, &attr, sizeof(attr)) < 0 ||
        move_mount(tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0) {
        saved = errno;
        close(tree);
        errno = saved;
        return fail(err, n, "bind", src);
    }
    s->binds[s->nbinds++] = tree;
    return 0;
}

int scratch_unbind_at(struct scratch *s, int target, char *err, size_t n)
{
    struct statx at, bound;
    char path[PATH_MAX];
    int i, fd;

    if (s->nbinds == 0)  /* a run's first: nothing to compare (no system call per run) */
        return 0;
    if (statx(target, "", AT_EMPTY_PATH, STATX_MNT_ID, &at) < 0)
        return fail(err, n, "statx", "the bind's target");
    for (i = 0; i < s->nbinds; i++) {
        fd = s->binds[i];
        if (statx(fd, "", AT_EMPTY_PATH, STATX_MNT_ID, &bound) < 0)
            return fail(err, n, "statx", "a bind");
        if (bound.stx_mnt_id != at.stx_mnt_id)
            continue;
        snprintf(path, sizeof(path), "%s/proc/self/fd/%d", scratch_root(s), fd);
        if (umount2(path, MNT_DETACH) < 0)
            return fail(err, n, "umount2", path);
        close(fd);
        s->binds[i] = s->binds[--s->nbinds];
        return 1;
    }
    return 0;
}

/* Every bind since the last reset not gone yet, detached through its descriptor: by path, a
 * run could have moved the mount point (renaming a directory above it). A bind in a tmpfs
 * just mounted anew went with it, in the same RCU grace period (which every detach waits
 * for): EINVAL, its mount is no longer in this namespace. */
static int unbind_all(struct scratch *s, char *err, size_t n)
{
    char path[PATH_MAX];
    int fd, failed;
    while (s->nbinds > 0) {
        fd = s->binds[--s->nbinds];
        /* The container's /proc is init's pid namespace's: self is init. */
        snprintf(path, sizeof(path), "%s/proc/self/fd/%d", scratch_root(s), fd);
        failed = umount2(path, MNT_DETACH) < 0 && errno != EINVAL ?
                 fail(err, n, "umount2", path) : 0;
        close(fd);
        if (failed)
            return -1;
    }
    return 0;
}

int scratch_reset(struct scratch *s, char *err, size_t n)
{
    char path[PATH_MAX];
    int i, yes;

    if (s->writable) {
        if (changed(s, scratch_upper(s), &s->writable->mark, err, n, &yes) < 0)
            return -1;
        if (yes && replace_root(s, err, n) < 0)
            return -1;
    }
    for (i = 0; i < s->n; i++) {
        struct tmpfs_mount *m = &s->mounts[i];
        join(path, scratch_root(s), m->target);
        if (changed(s, path, &m->mark, err, n, &yes) < 0)
            return -1;
        if (!yes)
            continue;
        if (umount2(path, MNT_DETACH) < 0)
            return fail(err, n, "umount2", path);
        if (mount_tmpfs(path, m->size, m->mode, m->inodes, m->flags, err, n) < 0)
            return -1;
    }
    /* Last: the binds left, over an image's file say (in a tmpfs mounted anew they are gone
     * already; in a replaced writable root's old slot they are detached here). */
    if (unbind_all(s, err, n) < 0)
        return -1;
    if (read_marks(s, err, n) < 0)
        return -1;
    s->doubt = 0;
    return 0;
}
