/* caps - capabilities and privileged operations (security.md §7 "capabilities",
 * "device access"; moby TestUserNoEffectiveCapabilities*; amicontained).
 * Attack: use whatever capabilities are left: chown a file to another uid, mknod a /dev/mem
 * node (char 1:1), sethostname (to the current name: harmless if it works), raw and packet
 * sockets, SO_MARK / IP_TRANSPARENT, a negative nice value.
 * Safe outcome: CapInh/CapPrm/CapEff/CapBnd/CapAmb all 0, NoNewPrivs 1, Seccomp 2
 * (filter mode), and every attempt fails. Works as uid 0 in a single-id user namespace or
 * as 65534 with a full range mapped.
 */
#include "probe.h"
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

/* Another uid mapped in our user namespace, or -1. Prefers 0 when we are not root. */
static long other_mapped_uid(void)
{
    FILE *f = fopen("/proc/self/uid_map", "r");
    if (!f)
        return -1;
    unsigned long in, out, count;
    long me = (long)getuid(), best = -1;
    while (fscanf(f, "%lu %lu %lu", &in, &out, &count) == 3) {
        if (me != 0 && in == 0) {
            best = 0;
            break;
        }
        for (unsigned long u = in; u < in + count && u < in + 3; u++)
            if ((long)u != me && best < 0)
                best = (long)u;
    }
    fclose(f);
    return best;
}

static char *scratch_dir(void)
{
    static char path[64];
    static const char *const bases[] = {"/tmp", "/dev/shm", "/var/tmp", "."};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/sbxprobe.XXXXXX", bases[i]);
        if (mkdtemp(path))
            return path;
    }
    return NULL;
}

int main(void)
{
    probe_init();
    static const char *const zero[] = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"};
    char v[128];
    for (int i = 0; i < 5; i++) {
        if (status_field(zero[i], v, sizeof v) != 0)
            note_unsafe("%s missing", zero[i]);
        else if (strtoull(v, NULL, 16) != 0)
            note_unsafe("%s=%s", zero[i], v);
    }
    if (status_field("NoNewPrivs", v, sizeof v) != 0 || strcmp(v, "1") != 0)
        note_unsafe("NoNewPrivs=%s", v);
    if (status_field("Seccomp", v, sizeof v) != 0 || strcmp(v, "2") != 0)
        note_unsafe("Seccomp=%s (want 2, filter mode)", v);
    if (R->n_unsafe == 0)
        note_safe("no capabilities, NoNewPrivs=1, Seccomp=2");

    char *dir = scratch_dir();
    if (!dir) {
        note_safe("no writable directory: chown/mknod not tried (%s)", en(errno));
    } else {
        char file[128], node[128];
        snprintf(file, sizeof file, "%s/file", dir);
        snprintf(node, sizeof node, "%s/mem", dir);
        int fd = open(file, O_CREAT | O_RDWR | O_CLOEXEC, 0600);
        long other = other_mapped_uid();
        if (fd < 0)
            note_safe("chown not tried: cannot create %s (%s)", file, en(errno));
        else if (other < 0)
            note_safe("chown not tried: no other uid is mapped");
        else {
            char what[48];
            snprintf(what, sizeof what, "fchown(file, %ld)", other);
            expect_fail(what, fchown(fd, (uid_t)other, (gid_t)-1));
        }
        close_fd(fd);
        expect_fail("mknod(c 1:1)", mknod(node, S_IFCHR | 0600, makedev(1, 1)));
        unlink(node);
        unlink(file);
        rmdir(dir);
    }

    char host[256] = "";
    if (gethostname(host, sizeof host) != 0)
        die("gethostname: %s", en(errno));
    expect_fail("sethostname(same name)", sethostname(host, strlen(host)));

    close_fd(expect_fail("socket(AF_PACKET, SOCK_RAW)",
                         socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL))));
    close_fd(expect_fail("socket(AF_INET, SOCK_RAW)",
                         socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW)));
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        int one = 1;
        expect_fail("setsockopt(SO_MARK)", setsockopt(s, SOL_SOCKET, SO_MARK, &one, sizeof one));
        expect_fail("setsockopt(IP_TRANSPARENT)",
                    setsockopt(s, SOL_IP, IP_TRANSPARENT, &one, sizeof one));
        close(s);
    }
    expect_fail("setpriority(-5)", setpriority(PRIO_PROCESS, 0, -5));
    return probe_finish();
}
