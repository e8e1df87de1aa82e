/* devices - device nodes (security.md §7 "device access"; §4.1 Docker's device cgroup
 * allows only null, zero, full, random, urandom, tty, and denies fuse).
 * Attack: open physical memory, I/O ports, the kernel log, fuse, kvm, tun, vsock, consoles,
 * MSRs, loop and disk devices; look for any block device in /dev.
 * Safe outcome: none of them opens (open only, read-only and non-blocking: nothing is read
 * or written, so a run on the host is harmless) and /dev holds no block device.
 */
#include "probe.h"
#include <dirent.h>
#include <sys/stat.h>

static const char *const DEVICES[] = {
    "/dev/mem",     "/dev/kmem",          "/dev/port",         "/dev/kmsg",
    "/dev/fuse",    "/dev/kvm",           "/dev/net/tun",      "/dev/vsock",
    "/dev/vhost-vsock", "/dev/console",   "/dev/tty0",         "/dev/tty1",
    "/dev/cpu/0/msr", "/dev/loop-control", "/dev/mapper/control", "/dev/sda",
    "/dev/vda",     "/dev/nvme0n1",
};

int main(void)
{
    probe_init();
    int missing = 0;
    for (size_t i = 0; i < sizeof DEVICES / sizeof *DEVICES; i++) {
        int fd = open(DEVICES[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd >= 0) {
            note_unsafe("opened %s", DEVICES[i]);
            close(fd);
        } else if (errno == ENOENT) {
            missing++;
        } else {
            note_safe("%s: %s", DEVICES[i], en(errno));
        }
    }
    note_safe("%d of %zu absent", missing, sizeof DEVICES / sizeof *DEVICES);
    DIR *d = opendir("/dev");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300];
        struct stat st;
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        if (lstat(path, &st) == 0 && S_ISBLK(st.st_mode))
            note_unsafe("block device %s", path);
    }
    if (d)
        closedir(d);
    return probe_finish();
}
