/*
 * sbx-init helper LINK CONTROL USERNS HOST_NETWORK: makes one container, up to its init.
 *
 * The spawner (sandbox/runtime/spawner.py) starts helpers ahead, before any container asks
 * for one. A helper joins USERNS first if it is not -1 (the id mapper's user namespace:
 * idmap.py, mapper.c), unshares user, mount, ipc, uts and (unless HOST_NETWORK is 1) net
 * namespaces, says so ({"ev": "unshared"} on LINK, SOCK_SEQPACKET, MessagePack as
 * protocol.py) and waits while the spawner writes its id map. Until a request comes it
 * holds nothing of a container: no cgroup, no layer, no tenant's data.
 *
 * The request (one message, the create request the host sent, with the descriptors of the
 * container's cgroups: `container_cgroup_fds` of the container's own, then its init leaf's)
 * says the rest. The helper joins the container's cgroup and only then unshares the cgroup
 * namespace (rooted where it is made), opens the layers, becomes root of its namespace,
 * carries out its part of the mount plan (`mounts`: rootfs.h), sets the hostname, brings
 * `lo` up and, for the `proxy` network, hands over a listener on 127.0.0.1:`proxy_port`
 * ({"ev": "listener"} and the socket), or adds `unreachable` routes (rtnetlink requests the
 * host built, each with the range it names) for `full`. It moves to init's leaf, makes the
 * pid namespace and clones init as the spawner's own child (CLONE_PARENT: the spawner, a
 * subreaper, reaps it, and init's parent-death signal, set first thing, is the spawner's
 * death), answers {"ev": "started", "pid": N} and exits. Init is init_main (init.c) with the
 * request's `init` map.
 *
 * Being exec'd in the host's user namespace, the helper's memory (and so init's, a clone of
 * it) belongs to that namespace: once not dumpable, their /proc files are the host root's,
 * never container root's (who could otherwise raise init's oom_score_adj, for one). The
 * helper stays dumpable until the request: the spawner (or the mapper) writes its id map,
 * and for `full` opens its namespaces, through /proc.
 *
 * Any failure is answered with {"ev": "failed", "error": what failed}, and the helper exits.
 */
#define _GNU_SOURCE
#include "helper.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "init.h"
#include "mp.h"
#include "rootfs.h"

static int link_fd = -1;
static char why[2048];

static void send_event(const struct mp_writer *w, int fd)
{
    channel_send(link_fd, w->buf, w->len, fd);
}

static void send_ev(const char *ev)
{
    struct mp_writer w = {.len = 0};
    mp_w_map(&w, 1);
    mp_w_cstr(&w, "ev");
    mp_w_cstr(&w, ev);
    send_event(&w, -1);
}

static __attribute__((noreturn)) void failed(void)
{
    static struct mp_writer w;
    w.len = 0;
    mp_w_map(&w, 2);
    mp_w_cstr(&w, "ev");
    mp_w_cstr(&w, "failed");
    mp_w_cstr(&w, "error");
    mp_w_cstr(&w, why);
    send_event(&w, -1);
    _exit(1);
}

static __attribute__((noreturn)) void failed_call(const char *what)
{
    int e = errno;
    snprintf(why, sizeof(why), "[Errno %d] %s: %s", e, what, strerror(e));
    failed();
}

static __attribute__((noreturn)) void failed_request(const char *what)
{
    snprintf(why, sizeof(why), "bad create request: %s", what);
    failed();
}

/* The request and its descriptors; NULL at EOF (a spare the spawner no longer wants). */
static uint8_t *receive(size_t *len, int *fds, int *nfds)
{
    static uint8_t inline_buf[INLINE_MAX];
    uint8_t *body;
    ssize_t n;
    int cut;

    while ((n = channel_recv(link_fd, inline_buf, sizeof(inline_buf), fds, nfds, 0, &cut)) < 0 &&
           errno == EINTR)
        ;
    if (n < 0)
        failed_call("reading the request");
    if (n == 0 && *nfds == 0)
        return NULL;
    if (cut)
        failed_request("truncated");
    *len = (size_t)n;
    if (*len != sizeof(IN_MEMFD) || memcmp(inline_buf, IN_MEMFD, *len) != 0)
        return inline_buf;
    if (*nfds == 0 || !(body = read_all(fds[*nfds - 1], len)))
        failed_request("its body could not be read");
    close(fds[--*nfds]);
    return body;
}

static void write_all_fds(const int *fds, int n, const char *what)
{
    int i;
    for (i = 0; i < n; i++)
        if (write(fds[i], "0", 1) != 1)
            failed_call(what);
}

static void loopback_up(void)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        failed_call("socket for lo");
    memset(&ifr, 0, sizeof(ifr));
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        failed_call("SIOCGIFFLAGS lo");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        failed_call("SIOCSIFFLAGS lo");
    close(s);
}

/* For `proxy`: the listener the container's runs reach the proxy through, handed to the
 * spawner (the host's from then on). */
static void proxy_listener(int64_t port)
{
    struct mp_writer w = {.len = 0};
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 128) < 0)
        failed_call("the proxy's listener");
    mp_w_map(&w, 1);
    mp_w_cstr(&w, "ev");
    mp_w_cstr(&w, "listener");
    send_event(&w, s);
    close(s);
}

/* For `full`: each [range, rtnetlink request] of `routes` sent and acknowledged (the
 * requests replace a route of the same destination: slirp4netns configures tap0 meanwhile). */
static void unreachable_routes(const struct mp_value *routes)
{
    struct mp_value pair, range, req;
    uint8_t reply[4096];
    uint32_t i;
    ssize_t n;
    int s;

    if (routes->type != MP_ARRAY)
        failed_request("unreachable: a list of [range, request] expected");
    if ((s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)) < 0)
        failed_call("socket(AF_NETLINK)");
    for (i = 0; i < routes->len; i++) {
        struct nlmsghdr *h = (struct nlmsghdr *)reply;
        if (mp_item(routes, i, &pair) < 0 || pair.type != MP_ARRAY || pair.len != 2 ||
            mp_item(&pair, 0, &range) < 0 || range.type != MP_STR ||
            mp_item(&pair, 1, &req) < 0 || req.type != MP_BIN)
            failed_request("unreachable: a list of [range, request] expected");
        if (send(s, req.data, req.len, 0) != (ssize_t)req.len ||
            (n = recv(s, reply, sizeof(reply), 0)) < (ssize_t)sizeof(*h))
            failed_call("rtnetlink");
        if (h->nlmsg_type == NLMSG_ERROR && (size_t)n >= sizeof(*h) + sizeof(int)) {
            int error = *(int *)NLMSG_DATA(h);
            if (error) {
                snprintf(why, sizeof(why), "[Errno %d] unreachable route %.*s: %s", -error,
                         (int)range.len, (const char *)range.data, strerror(-error));
                failed();
            }
        }
    }
    close(s);
}

static void network(const struct mp_value *req)
{
    struct mp_value v;
    int64_t port;
    loopback_up();
    if (mp_get(req, "proxy_port", &v) == 0 && v.type != MP_NIL) {
        if (mp_int(&v, 1, 65535, &port) < 0)
            failed_request("proxy_port must be a port");
        proxy_listener(port);
    }
    if (mp_get(req, "unreachable", &v) == 0 && v.type != MP_NIL)
        unreachable_routes(&v);
}

/* Every descriptor but 0-2 and the `n` of `keep` (-1 for none) closed: the spawner's are
 * close-on-exec, but a helper holds nothing it was not meant to, whatever changes there. */
static void close_others(const int *keep, int n)
{
    int fd, i, top = 2;
    for (i = 0; i < n; i++)
        if (keep[i] > top)
            top = keep[i];
    for (fd = 3; fd < top; fd++) {
        for (i = 0; i < n && keep[i] != fd; i++)
            ;
        if (i == n)
            close(fd);
    }
    syscall(SYS_close_range, (unsigned int)top + 1, ~0U, 0);
}

int helper_main(int link, int control, int userns, int host_network)
{
    static struct mp_writer w;
    struct rootfs_layers layers = {NULL, 0};
    struct mp_value req, v, config;
    char hostname[65];
    int fds[MAX_FDS], nfds = 0, skeleton = 0, i, flags, spawner;
    int64_t n_container;
    uint8_t *buf;
    size_t len;
    pid_t pid;
    const int keep[3] = {link, control, userns};

    close_others(keep, 3);
    link_fd = link;
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* Its id map is written through /proc (main made every mode of sbx-init undumpable). */
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    if (userns >= 0 && (setns(userns, CLONE_NEWUSER) < 0 || close(userns) < 0))
        failed_call("setns into the id mapper's user namespace");
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS;
    if (!host_network)
        flags |= CLONE_NEWNET;
    if (unshare(flags) < 0)
        failed_call("unshare");
    send_ev("unshared");

    if (!(buf = receive(&len, fds, &nfds)))
        _exit(0);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (mp_parse(buf, len, &req) < 0 || req.type != MP_MAP)
        failed_request("not a MessagePack map");
    if (mp_get(&req, "container_cgroup_fds", &v) < 0 || mp_int(&v, 0, nfds, &n_container) < 0)
        failed_request("container_cgroup_fds must count the descriptors sent");
    if (mp_get(&req, "init", &config) < 0 || config.type != MP_MAP)
        failed_request("init: init's configuration, a map, expected");
    /* Init, cloned from here, starts in the container's cgroup; the cgroup namespace is
     * rooted there. */
    write_all_fds(fds, (int)n_container, "joining the container's cgroup");
    if (unshare(CLONE_NEWCGROUP) < 0)
        failed_call("unshare cgroup");
    if (mp_get(&req, "mounts", &v) < 0)
        failed_request("mounts: the helper's part of the mount plan expected");
    if (rootfs_open_layers(&v, &layers, why, sizeof(why)) < 0)
        failed();
    if (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
        failed_call("setresuid 0");
    /* Where that changed the effective id (a direct map: host root to a subordinate id),
     * the kernel set dumpable back to fs.suid_dumpable and cleared the death signal. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (rootfs_execute(&v, &layers, &skeleton, why, sizeof(why)) < 0)
        failed();
    for (i = 0; i < layers.n; i++)
        close(layers.fds[i]);
    if (mp_get(&req, "hostname", &v) < 0 || v.type != MP_STR || v.len == 0 ||
        v.len >= sizeof(hostname))
        failed_request("hostname must be 1 to 64 bytes");
    memcpy(hostname, v.data, v.len);
    if (sethostname(hostname, v.len) < 0)
        failed_call("sethostname");
    if (!host_network)
        network(&req);
    /* Init's own leaf, where init starts: on cgroup v2 the container's own cgroup must hold
     * no process once runs' cgroups take its controllers. */
    write_all_fds(fds + n_container, nfds - (int)n_container, "joining init's cgroup");
    for (i = 0; i < nfds; i++)
        close(fds[i]);
    if (unshare(CLONE_NEWPID) < 0)
        failed_call("unshare pid");
    /* Init's parent is the spawner, whose end it must not outlive: a clone starts without
     * a death signal, so init checks, once it has one, that the spawner is still there. */
    if ((spawner = (int)syscall(SYS_pidfd_open, getppid(), 0)) < 0)
        failed_call("pidfd_open of the spawner");
    /* A raw clone, as glibc has no fork with CLONE_PARENT: the child's thread block still
     * holds the helper's tid. Init is single-threaded and uses nothing that reads it (no
     * pthread calls on itself, no error-checking or robust mutexes). */
    pid = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid < 0)
        failed_call("clone init");
    if (pid == 0) {
        struct pollfd gone = {.fd = spawner, .events = POLLIN};
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (poll(&gone, 1, 0) != 0)
            _exit(1);
        close(spawner);
        close(link_fd);
        _exit(init_main(control, &config, skeleton));
    }
    close(spawner);
    close(control);
    mp_w_map(&w, 2);
    mp_w_cstr(&w, "ev");
    mp_w_cstr(&w, "started");
    mp_w_cstr(&w, "pid");
    mp_w_int(&w, pid);
    send_event(&w, -1);
    return 0;
}
