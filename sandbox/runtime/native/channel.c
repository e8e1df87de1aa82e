#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

const uint8_t IN_MEMFD[8] = {0x81, 0xa5, 'm', 'e', 'm', 'f', 'd', 0xc3};

int channel_send(int sock, const void *data, size_t len, int fd)
{
    struct iovec iov = {(void *)data, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

    if (fd >= 0) {
        struct cmsghdr *c;
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    for (;;) {
        if (sendmsg(sock, &mh, MSG_NOSIGNAL) >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

ssize_t channel_recv(int sock, uint8_t *buf, size_t cap, int *fds, int *nfds, int flags,
                     int *cut)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, cap};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                        .msg_controllen = sizeof(u.buf)};
    struct cmsghdr *c;
    ssize_t n;

    *nfds = 0;
    *cut = 0;
    n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | flags);
    if (n < 0)
        return -1;
    for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (k > MAX_FDS - *nfds)
                k = MAX_FDS - *nfds;
            memcpy(fds + *nfds, CMSG_DATA(c), sizeof(int) * (size_t)k);
            *nfds += k;
        }
    *cut = (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
    return n;
}

uint8_t *read_all(int fd, size_t *len)
{
    size_t cap = 1 << 16, got = 0;
    uint8_t *buf = malloc(cap), *more;
    ssize_t n;
    while (buf) {
        if (got == cap) {
            if (cap >= MAX_MESSAGE || !(more = realloc(buf, cap * 2)))
                break;
            buf = more;
            cap *= 2;
        }
        n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        if (n == 0) {
            *len = got;
            return buf;
        }
        got += (size_t)n;
    }
    free(buf);
    return NULL;
}
