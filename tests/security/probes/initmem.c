/* initmem - reading the runtime's init (security.md §7 "ptrace other process",
 * "env/secret leakage", "/proc/self/exe overwrite"; moby TestAppArmorDeniesPtrace).
 * Attack: pid 1 is the runtime's init, which holds control sockets and knows the host;
 * read its memory, environment and maps, list its fds, walk its root and cwd, open its
 * executable, read its namespace links.
 * Safe outcome: init is non-dumpable, so every access fails or yields no data.
 */
#include "probe.h"

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
    expect_no_data("/proc/1/environ");
    expect_no_data("/proc/1/maps");
    expect_no_data("/proc/1/exe");
    expect_no_entries("/proc/1/fd");
    expect_no_entries("/proc/1/root/");
    expect_no_entries("/proc/1/cwd/");
    try_readlink("/proc/1/exe");
    try_readlink("/proc/1/root");
    try_readlink("/proc/1/ns/mnt");
    try_readlink("/proc/1/ns/net");
    return probe_finish();
}
