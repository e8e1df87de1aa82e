/*
 * sbx-init mapper SOCKET UID_MAP GID_MAP: the id maps of containers' user namespaces,
 * written without a setuid helper.
 *
 * An unprivileged service maps subordinate ids only through newuidmap and newgidmap: two
 * setuid execs, ~2 ms on a container's cold path. So that this is paid once per spawner,
 * the mapper makes a user namespace of its own, which the spawner maps with those helpers
 * (idmap.py), and every container's user namespace is made inside it (its child). Being
 * root there, with every capability, the mapper may write a child's maps itself: UID_MAP
 * and GID_MAP, in the parent's ids (each of its ranges mapped onto itself, so a child maps
 * the same host ids as the parent does).
 *
 * Protocol (SOCK_SEQPACKET): the mapper sends "u" once it has made its namespace, with a
 * descriptor of that namespace (the mapper is not dumpable: its /proc/PID/ns is closed), and
 * after that answers each request, a process id in decimal, with "ok" once that process's
 * maps are written or "E" and what failed. It exits at EOF, or with the spawner
 * (PDEATHSIG); it is not dumpable (main), so no process of its uid can trace it.
 */
#define _GNU_SOURCE
#include "mapper.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channel.h"

static int write_map(int pid, const char *which, const char *text, char *err, size_t n)
{
    char path[64];
    size_t len = strlen(text);
    int fd, ok;
    snprintf(path, sizeof(path), "/proc/%d/%s", pid, which);
    if ((fd = open(path, O_WRONLY | O_CLOEXEC)) < 0) {
        snprintf(err, n, "Eopen %s: %s", path, strerror(errno));
        return -1;
    }
    /* The kernel takes a map in one write only. */
    ok = write(fd, text, len) == (ssize_t)len;
    if (!ok)
        snprintf(err, n, "Ewrite %s: %s", path, strerror(errno));
    close(fd);
    return ok ? 0 : -1;
}

/* "u", and our user namespace as SCM_RIGHTS. */
static int send_namespace(int sock)
{
    int fd = open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC), sent;
    if (fd < 0)
        return -1;
    sent = channel_send(sock, "u", 1, fd);
    close(fd);
    return sent;
}

int mapper_main(int sock, const char *uid_map, const char *gid_map)
{
    char req[32], answer[256];
    char *end;
    ssize_t got;
    long pid;

    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (unshare(CLONE_NEWUSER) < 0) {
        snprintf(answer, sizeof(answer), "Eunshare user: %s", strerror(errno));
        send(sock, answer, strlen(answer), MSG_NOSIGNAL);
        return 1;
    }
    if (send_namespace(sock) < 0)
        return 1;
    for (;;) {
        got = recv(sock, req, sizeof(req) - 1, 0);
        if (got <= 0)
            return 0;
        req[got] = 0;
        errno = 0;
        pid = strtol(req, &end, 10);
        if (errno || *end || pid <= 0 || pid > 1 << 22)
            snprintf(answer, sizeof(answer), "Ea process id expected, got %.20s", req);
        else if (write_map((int)pid, "uid_map", uid_map, answer, sizeof(answer)) == 0 &&
                 write_map((int)pid, "gid_map", gid_map, answer, sizeof(answer)) == 0)
            strcpy(answer, "ok");
        if (send(sock, answer, strlen(answer), MSG_NOSIGNAL) < 0)
            return 1;
    }
}
