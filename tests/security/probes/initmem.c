/* initmem - reading the runtime's init (security.md §7 "ptrace other process",
 * "env/secret leakage", "/proc/self/exe overwrite"; moby TestAppArmorDeniesPtrace).
 * Attack: pid 1 is the runtime's init, which holds control sockets and knows the host;
 * read its memory, environment and maps, list its fds, walk its root and cwd, open its
 * executable, read its namespace links.
 * Safe outcome: init is non-dumpable, so every access fails or yields no data.
 */
#include "probe.h"
#include <dirent.h>

static void try_read(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        note_safe("open(%s)=%s", path, en(errno));
        return;
    }
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0)
        note_unsafe("read %zd bytes from %s", n, path);
    else if (n == 0)
        note_safe("%s: empty", path);
    else
        note_safe("read(%s)=%s", path, en(errno));
    close(fd);
}

static void try_list(const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        note_safe("opendir(%s)=%s", path, en(errno));
        return;
    }
    int n = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    if (n > 0)
        note_unsafe("listed %d entries of %s", n, path);
    else if (errno)
        note_safe("readdir(%s)=%s", path, en(errno));
    else
        note_safe("%s: no entries", path);
    closedir(d);
}

static void try_readlink(const char *path)
{
    char buf[256];
    ssize_t n = readlink(path, buf, sizeof buf - 1);
    if (n >= 0) {
        buf[n] = 0;
        note_unsafe("readlink(%s)=%s", path, buf);
    } else {
        note_safe("readlink(%s)=%s", path, en(errno));
    }
}

int main(void)
{
    probe_init();
    if (getpid() == 1)
        die("the probe itself is pid 1; nothing to attack");
    if (access("/proc/1", F_OK) != 0)
        die("/proc/1 is not visible (%s); is /proc mounted?", en(errno));

    /* /proc/1/mem: opening is the gate (mm_access); reading offset 0 would only give EIO. */
    int fd = open("/proc/1/mem", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        note_unsafe("opened /proc/1/mem");
        close(fd);
    } else {
        note_safe("open(/proc/1/mem)=%s", en(errno));
    }
    try_read("/proc/1/environ");
    try_read("/proc/1/maps");
    try_read("/proc/1/exe");
    try_list("/proc/1/fd");
    try_list("/proc/1/root/");
    try_list("/proc/1/cwd/");
    try_readlink("/proc/1/exe");
    try_readlink("/proc/1/root");
    try_readlink("/proc/1/ns/mnt");
    try_readlink("/proc/1/ns/net");
    return probe_finish();
}
