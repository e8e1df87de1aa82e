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
    for (size_t i = 0; i < sizeof MASKED_FILES / sizeof *MASKED_FILES; i++)
        expect_no_data(MASKED_FILES[i]);
    for (size_t i = 0; i < sizeof MASKED_DIRS / sizeof *MASKED_DIRS; i++)
        expect_no_entries(MASKED_DIRS[i]);
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
