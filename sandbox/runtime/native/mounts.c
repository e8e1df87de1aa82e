#define _GNU_SOURCE
#include "mounts.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "rootfs.h"

#define SAFE (MS_NOSUID | MS_NODEV)

static int failed(char *err, size_t n, const char *call, const char *target)
{
    snprintf(err, n, "[Errno %d] %s(%s): %s", errno, call, target, strerror(errno));
    return -1;
}

static int one(const char *op, const char *target, char *err, size_t n)
{
    struct stat st;
    if (strcmp(op, "proc") == 0) {
        if (mount("proc", target, "proc", SAFE | MS_NOEXEC, NULL) < 0)
            return failed(err, n, "mount proc", target);
    } else if (strcmp(op, "mask") == 0) {
        /* An empty read-only tmpfs over a directory, /dev/null over anything else. */
        if (stat(target, &st) < 0)
            return 0;
        if (S_ISDIR(st.st_mode)) {
            if (mount("tmpfs", target, "tmpfs", SAFE | MS_NOEXEC | MS_RDONLY, "size=0") < 0)
                return failed(err, n, "mount tmpfs", target);
        } else if (mount("/dev/null", target, NULL, MS_BIND, NULL) < 0) {
            return failed(err, n, "mount /dev/null", target);
        }
    } else if (strcmp(op, "readonly") == 0) {
        if (stat(target, &st) < 0)
            return 0;
        if (mount(target, target, NULL, MS_BIND | MS_REC, NULL) < 0)
            return failed(err, n, "mount bind", target);
        if (mount(NULL, target, NULL,
                  MS_REMOUNT | MS_BIND | MS_RDONLY | locked_mount_flags(target), NULL) < 0)
            return failed(err, n, "remount read-only", target);
    } else if (strcmp(op, "pivot_root") == 0) {
        /* Nothing of the host remains: the old root goes, lazily, once nothing uses it. */
        if (chdir(target) < 0)
            return failed(err, n, "chdir", target);
        if (syscall(SYS_pivot_root, ".", ".") < 0)
            return failed(err, n, "pivot_root", target);
        if (umount2(".", MNT_DETACH) < 0)
            return failed(err, n, "umount2", "the old root");
        if (chdir("/") < 0)
            return failed(err, n, "chdir", "/");
    } else {
        snprintf(err, n, "mounts: %s is not an operation init does", op);
        return -1;
    }
    return 0;
}

int mounts_execute(const struct mp_value *ops, char *err, size_t n)
{
    struct mp_value item, op, target;
    char opname[16], path[4096];
    uint32_t i;

    if (ops->type != MP_ARRAY) {
        snprintf(err, n, "mounts: a list of {op, target} expected");
        return -1;
    }
    for (i = 0; i < ops->len; i++) {
        if (mp_item(ops, i, &item) < 0 || mp_get(&item, "op", &op) < 0 || op.type != MP_STR ||
            op.len >= sizeof(opname) || mp_get(&item, "target", &target) < 0 ||
            target.type != MP_STR || target.len >= sizeof(path) ||
            memchr(target.data, 0, target.len)) {
            snprintf(err, n, "mounts: item %u is not {op, target}", i);
            return -1;
        }
        memcpy(opname, op.data, op.len);
        opname[op.len] = 0;
        memcpy(path, target.data, target.len);
        path[target.len] = 0;
        if (one(opname, path, err, n) < 0)
            return -1;
    }
    return 0;
}
