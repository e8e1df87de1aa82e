/* exit(0), and nothing before it: no libc, so none of a C library's start-up runs (glibc's
 * probes the CPU with CPUID, each of which the hypervisor traps; ~0.57 ms of busybox
 * `true`'s 0.64 on the 2-vCPU VM of docs/benchmarks.md, against 0.064 ms for this).
 * Run bare and sandboxed, it shows a run's cost apart from the program's own start:
 * loadtest.api and loadtest.runtime print both. Built with -static -nostdlib. */
void _start(void)
{
#if defined(__x86_64__)
    __asm__ volatile("mov $60, %eax\n\txor %edi, %edi\n\tsyscall");
#elif defined(__aarch64__)
    __asm__ volatile("mov x8, #93\n\tmov x0, #0\n\tsvc #0");
#else
#error "exit0.c: no exit system call written for this architecture"
#endif
    for (;;)
        ;
}
