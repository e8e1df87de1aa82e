/* kernelops - host-wide kernel operations (security.md §7 "kernel/host ops",
 * "clock/timing", "personality flags"; §1.4 Docker's blocked-syscall table;
 * moby TestRunSeccompDefaultProfileAcct; runc personality.bats).
 * Attack: kexec_load, kexec_file_load, init_module, finit_module, delete_module,
 * reboot(LINUX_REBOOT_CMD_CAD_OFF), swapon, swapoff, acct, settimeofday, clock_settime,
 * iopl, ioperm, personality(READ_IMPLIES_EXEC) and personality(ADDR_NO_RANDOMIZE).
 * Safe outcome: all fail.
 * Host safety when run by hand as root: kexec/module/reboot/swap/acct calls carry arguments
 * the kernel refuses right after its permission check (too many segments, empty image,
 * fd -1, a module that does not exist, a wrong reboot magic, missing files), so only
 * EPERM/EACCES/ENOSYS count as safe for them; settimeofday(NULL, NULL) changes nothing;
 * clock_settime (writing back the time just read) is only called without CAP_SYS_TIME;
 * iopl/ioperm/personality are reset.
 */
#include "probe.h"
#include <linux/reboot.h>
#include <sys/io.h>
#include <sys/personality.h>
#include <sys/time.h>
#include <time.h>

int main(void)
{
    probe_init();
    expect_denied("kexec_load", syscall(SYS_kexec_load, 0UL, 17UL /* > KEXEC_SEGMENT_MAX */, NULL, 0UL));
    expect_denied("kexec_file_load", syscall(SYS_kexec_file_load, -1, -1, 0UL, "", 0UL));
    expect_denied("init_module", syscall(SYS_init_module, NULL, 0UL, ""));
    expect_denied("finit_module", syscall(SYS_finit_module, -1, "", 0));
    expect_denied("delete_module", syscall(SYS_delete_module, "sbxprobe_missing", O_NONBLOCK));
    expect_denied("reboot(CAD_OFF)", syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, 0 /* bad magic2 */,
                                             LINUX_REBOOT_CMD_CAD_OFF, NULL));
    expect_denied("swapon", syscall(SYS_swapon, "/nonexistent-sbxprobe", 0));
    expect_denied("swapoff", syscall(SYS_swapoff, "/nonexistent-sbxprobe"));
    expect_denied("acct", syscall(SYS_acct, "/nonexistent-sbxprobe/acct"));

    expect_fail("settimeofday(NULL, NULL)", syscall(SYS_settimeofday, NULL, NULL));
    /* Only CAP_SYS_TIME lets clock_settime succeed, and a success would step the shared
     * clock, so with that capability the probe reports it instead of calling. */
    if (has_cap(25 /* CAP_SYS_TIME */)) {
        note_unsafe("CAP_SYS_TIME is effective (clock_settime not called)");
    } else {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        expect_fail("clock_settime(REALTIME, now)",
                    syscall(SYS_clock_settime, CLOCK_REALTIME, &now));
    }

    if (expect_fail("iopl(3)", iopl(3)) == 0)
        iopl(0);
    if (expect_fail("ioperm(0x80)", ioperm(0x80, 1, 1)) == 0)
        ioperm(0x80, 1, 0);

    int old = personality(0xffffffff);
    if (expect_fail("personality(READ_IMPLIES_EXEC)", personality(READ_IMPLIES_EXEC)) != -1)
        personality((unsigned long)old);
    if (expect_fail("personality(ADDR_NO_RANDOMIZE)", personality(ADDR_NO_RANDOMIZE)) != -1)
        personality((unsigned long)old);
    return probe_finish();
}
