/* procmask - masked and read-only /proc (security.md §7 "read masked /proc",
 * "write /proc/sysrq-trigger", "write /proc/asound", "chmod procfs"; §4.1 Docker's
 * maskedPaths/readonlyPaths; moby TestRunReadFilteredProc, TestRunWriteFilteredProc,
 * TestRunApparmorProcDirectory; runc mask.bats).
 * Attack: read kernel memory, keys, timers and interrupt counts from /proc; open
 * /proc/sysrq-trigger, core_pattern and modprobe for writing (an open for writing is the
 * gate: EROFS/EACCES there; the probe never writes, so a run on the host is harmless);
 * chmod /proc/1/cgroup and /proc/1/attr/current.
 * Safe outcome: masked files give no data (error or empty), masked directories are absent
 * or empty, the writable-open attempts and the chmods fail.
 */
#include "probe.h"
#include <dirent.h>
#include <sys/stat.h>

static const char *const MASKED_FILES[] = {
    "/proc/kcore",         "/proc/keys",      "/proc/timer_list", "/proc/sched_debug",
    "/proc/latency_stats", "/proc/interrupts", "/proc/timer_stats",
};
static const char *const MASKED_DIRS[] = {"/proc/acpi", "/proc/asound", "/proc/scsi"};
static const char *const READONLY[] = {
    "/proc/sysrq-trigger",
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
};
static const char *const CHMOD[] = {"/proc/1/cgroup", "/proc/1/attr/current"};

int main(void)
{
    probe_init();
    for (size_t i = 0; i < sizeof MASKED_FILES / sizeof *MASKED_FILES; i++) {
        const char *p = MASKED_FILES[i];
        int fd = open(p, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            note_safe("%s: %s", p, en(errno));
            continue;
        }
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n > 0)
            note_unsafe("read %zd bytes from %s", n, p);
        else if (n == 0)
            note_safe("%s: empty", p);
        else
            note_safe("%s: read %s", p, en(errno));
        close(fd);
    }
    for (size_t i = 0; i < sizeof MASKED_DIRS / sizeof *MASKED_DIRS; i++) {
        const char *p = MASKED_DIRS[i];
        DIR *d = opendir(p);
        if (!d) {
            note_safe("%s: %s", p, en(errno));
            continue;
        }
        int n = 0;
        struct dirent *e;
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                n++;
        closedir(d);
        if (n)
            note_unsafe("%s lists %d entries", p, n);
        else
            note_safe("%s: empty", p);
    }
    for (size_t i = 0; i < sizeof READONLY / sizeof *READONLY; i++) {
        char what[96];
        snprintf(what, sizeof what, "open(%s, O_WRONLY)", READONLY[i]);
        close_fd(expect_fail(what, open(READONLY[i], O_WRONLY | O_CLOEXEC)));
    }
    for (size_t i = 0; i < sizeof CHMOD / sizeof *CHMOD; i++) {
        char what[96];
        snprintf(what, sizeof what, "chmod(%s, 0777)", CHMOD[i]);
        expect_fail(what, chmod(CHMOD[i], 0777));
    }
    return probe_finish();
}
