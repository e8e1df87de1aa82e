/*
 * The control channel's messages (as sandbox/runtime/protocol.py): one MessagePack map per
 * SOCK_SEQPACKET datagram, descriptors as SCM_RIGHTS, and a message too big for a datagram
 * in a memfd sent as the last descriptor after the marker {"memfd": true}.
 */
#ifndef SBX_CHANNEL_H
#define SBX_CHANNEL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* The largest inline message, descriptors per message, the largest body sent through a
 * memfd, and the marker of such a message. */
#define INLINE_MAX (64 << 10)
#define MAX_FDS 32
#define MAX_MESSAGE (16 << 20)
extern const uint8_t IN_MEMFD[8];

/* `len` bytes of `data` as one datagram, with descriptor `fd` if it is not -1; 0, or -1
 * with errno set (a peer that is gone shows up on the next read). */
int channel_send(int sock, const void *data, size_t len, int fd);

/* One datagram into `buf` (of `cap`), its descriptors (close-on-exec, at most MAX_FDS) into
 * `fds` and their count into *nfds; `flags` as recvmsg's. Returns its length, or -1 with
 * errno set; *cut says whether the datagram or its descriptors did not fit. */
ssize_t channel_recv(int sock, uint8_t *buf, size_t cap, int *fds, int *nfds, int flags,
                     int *cut);

/* Everything `fd` holds from its offset to its end (a memfd's message body); NULL if it
 * cannot be read or is over MAX_MESSAGE. */
uint8_t *read_all(int fd, size_t *len);

#endif
