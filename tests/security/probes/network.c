/* network - reaching the host's network (security.md §7 "network egress",
 * "abstract unix sockets"; §4.2 CVE-2020-15257: abstract sockets are reachable from any
 * process sharing the network namespace).
 * Usage: network PORT ABSTRACT_NAME   (the host listens on 127.0.0.1:PORT and on the
 * abstract unix socket "@ABSTRACT_NAME" for the duration of the test).
 * Attack: connect to both; look for the name in /proc/net/unix; list the interfaces;
 * connect to the cloud metadata address 169.254.169.254:80.
 * Safe outcome: both connects fail, the name is not listed, the only interface is lo, and
 * the metadata address is unreachable.
 */
#include "probe.h"
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static void tcp_connect(const char *ip, int port, int timeout_ms)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, ip, &sa.sin_addr);
    char what[64];
    snprintf(what, sizeof what, "connect(%s:%d)", ip, port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_INET): %s", en(errno));
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int err = 0;
        socklen_t len = sizeof err;
        if (poll(&p, 1, timeout_ms) == 0) {
            note_safe("%s: no answer in %d ms", what, timeout_ms);
            close(fd);
            return;
        }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        rc = err ? -1 : 0;
        errno = err;
    }
    expect_fail(what, rc);
    close(fd);
}

static void add_interface(char *names, size_t size, const char *name, int *others)
{
    if (strcmp(name, "lo"))
        (*others)++;
    size_t l = strlen(names);
    if (l + strlen(name) + 2 < size)
        snprintf(names + l, size - l, "%s%.64s", l ? "," : "", name);
}

int main(int argc, char **argv)
{
    probe_init();
    if (argc != 3)
        die("usage: network PORT ABSTRACT_NAME");
    int port = atoi(argv[1]);
    const char *name = argv[2];

    tcp_connect("127.0.0.1", port, 2000);

    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t nlen = strlen(name);
    if (nlen + 1 > sizeof sa.sun_path)
        die("abstract name too long");
    memcpy(sa.sun_path + 1, name, nlen); /* sun_path[0] == 0: abstract namespace */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_UNIX): %s", en(errno));
    int rc = connect(fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + nlen));
    if (rc < 0 && errno == EPROTOTYPE)
        note_unsafe("connect(@%s)=EPROTOTYPE: the host's socket is visible", name);
    else
        expect_fail("connect(@abstract)", rc);
    close(fd);

    FILE *f = fopen("/proc/net/unix", "r");
    if (!f) {
        note_safe("/proc/net/unix: %s", en(errno));
    } else {
        char line[1024], want[300];
        int found = 0;
        snprintf(want, sizeof want, " @%s", name);
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            size_t l = strlen(line), w = strlen(want);
            if (l >= w && strcmp(line + l - w, want) == 0)
                found = 1;
        }
        fclose(f);
        if (found)
            note_unsafe("/proc/net/unix lists @%s", name);
        else
            note_safe("/proc/net/unix does not list it");
    }

    char names[512] = "";
    int others = 0;
    struct if_nameindex *ifs = if_nameindex(); /* needs an AF_NETLINK socket */
    if (ifs) {
        for (struct if_nameindex *i = ifs; i->if_index; i++)
            add_interface(names, sizeof names, i->if_name, &others);
        if_freenameindex(ifs);
    } else if ((f = fopen("/proc/net/dev", "r"))) { /* "  name: counters..." */
        char line[512];
        while (fgets(line, sizeof line, f)) {
            char *colon = strchr(line, ':'), *name = line;
            if (!colon)
                continue;
            *colon = 0;
            while (*name == ' ')
                name++;
            add_interface(names, sizeof names, name, &others);
        }
        fclose(f);
    } else {
        note_unsafe("cannot list interfaces (if_nameindex and /proc/net/dev: %s)", en(errno));
    }
    if (others)
        note_unsafe("interfaces besides lo: %s", names);
    else
        note_safe("interfaces: %s", names[0] ? names : "(none)");

    tcp_connect("169.254.169.254", 80, 1500);
    return probe_finish();
}
