#define _GNU_SOURCE
#include "scratch.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>

static int read_mark(struct tmpfs_mount *m, char *err, size_t n)
{
    struct stat st;
    if (lstat(m->target, &st) < 0) {
        snprintf(err, n, "[Errno %d] stat('%s'): %s", errno, m->target, strerror(errno));
        return -1;
    }
    m->dev = st.st_dev;
    m->ctime_ns = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
    return 0;
}

static int read_marks(struct scratch *s, char *err, size_t n)
{
    int i;
    for (i = 0; i < s->n; i++)
        if (read_mark(&s->mounts[i], err, n) < 0)
            return -1;
    return 0;
}

int scratch_init(struct scratch *s, const struct mp_value *list, char *err, size_t n)
{
    struct mp_value item, v;
    int64_t x;
    uint32_t i;

    memset(s, 0, sizeof(*s));
    if (list->type != MP_ARRAY || !(s->mounts = calloc(list->len + 1, sizeof(*s->mounts)))) {
        snprintf(err, n, "resettable: a list of tmpfs mounts expected");
        return -1;
    }
    for (i = 0; i < list->len; i++) {
        struct tmpfs_mount *m = &s->mounts[i];
        if (mp_item(list, i, &item) < 0 || mp_get(&item, "target", &v) < 0 ||
            v.type != MP_STR || !(m->target = strndup((const char *)v.data, v.len)))
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
    return read_marks(s, err, n);
bad:
    snprintf(err, n, "resettable: item %u is not a tmpfs mount {target, size, mode, inodes, "
             "flags}", i);
    return -1;
}

void scratch_touching(struct scratch *s)
{
    struct timespec now;
    int64_t newest = 0, t;
    int i;
    for (i = 0; i < s->n; i++)
        if (s->mounts[i].ctime_ns > newest)
            newest = s->mounts[i].ctime_ns;
    /* The clock inode times are taken from. */
    clock_gettime(CLOCK_REALTIME_COARSE, &now);
    t = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    if (t <= newest)
        s->doubt = 1;
}

/* Owned by container root whoever mounts it: init runs under an id of its own by now. */
static int mount_tmpfs(const struct tmpfs_mount *m, char *err, size_t n)
{
    char data[128];
    int len = snprintf(data, sizeof(data), "size=%llu,mode=%o,uid=0,gid=0",
                       (unsigned long long)m->size, m->mode);
    if (m->inodes)
        snprintf(data + len, sizeof(data) - (size_t)len, ",nr_inodes=%llu",
                 (unsigned long long)m->inodes);
    if (mount("tmpfs", m->target, "tmpfs", m->flags, data) < 0) {
        snprintf(err, n, "[Errno %d] mount('tmpfs', '%s', 'tmpfs', %#lx, '%s'): %s", errno,
                 m->target, m->flags, data, strerror(errno));
        return -1;
    }
    return 0;
}

int scratch_reset(struct scratch *s, char *err, size_t n)
{
    struct tmpfs_mount now;
    int i;
    for (i = 0; i < s->n; i++) {
        struct tmpfs_mount *m = &s->mounts[i];
        now = *m;
        if (read_mark(&now, err, n) < 0)
            return -1;
        if (!s->doubt && now.dev == m->dev && now.ctime_ns == m->ctime_ns)
            continue;
        if (umount2(m->target, MNT_DETACH) < 0) {
            snprintf(err, n, "[Errno %d] umount2('%s'): %s", errno, m->target,
                     strerror(errno));
            return -1;
        }
        if (mount_tmpfs(m, err, n) < 0)
            return -1;
    }
    if (read_marks(s, err, n) < 0)
        return -1;
    s->doubt = 0;
    return 0;
}
