/* bpf_perf - bpf, perf_event_open, userfaultfd (security.md §7 "bpf / perf / userfaultfd").
 * Attack: load a BPF program and create a map, open a perf event on ourselves (allowed to
 * ordinary users at perf_event_paranoid<=2), create a userfaultfd (also the
 * UFFD_USER_MODE_ONLY variant open to ordinary users, and /dev/userfaultfd): all are
 * favourite tools of kernel exploits (verifier bugs, perf bugs, race widening).
 * Safe outcome: all fail.
 */
#include "probe.h"
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

int main(void)
{
    probe_init();

    struct bpf_insn prog[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 0}, /* r0 = 0 */
        {.code = BPF_JMP | BPF_EXIT},                                          /* exit */
    };
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    a.insns = (unsigned long)prog;
    a.insn_cnt = 2;
    a.license = (unsigned long)"GPL";
    close_fd(expect_fail("bpf(PROG_LOAD)", syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a)));

    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_ARRAY;
    a.key_size = 4;
    a.value_size = 4;
    a.max_entries = 1;
    close_fd(expect_fail("bpf(MAP_CREATE)", syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a)));

    struct perf_event_attr pe;
    memset(&pe, 0, sizeof pe);
    pe.size = sizeof pe;
    pe.type = PERF_TYPE_SOFTWARE;
    pe.config = PERF_COUNT_SW_TASK_CLOCK;
    pe.disabled = 1;
    pe.exclude_kernel = 1;
    pe.exclude_hv = 1;
    close_fd(expect_fail("perf_event_open(self)",
                         syscall(SYS_perf_event_open, &pe, 0, -1, -1, PERF_FLAG_FD_CLOEXEC)));

    close_fd(expect_fail("userfaultfd(0)", syscall(SYS_userfaultfd, O_CLOEXEC)));
    close_fd(expect_fail("userfaultfd(USER_MODE_ONLY)",
                         syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY)));
    close_fd(expect_fail("open(/dev/userfaultfd)", open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)));
    return probe_finish();
}
