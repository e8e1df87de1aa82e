/* int80 - non-native (i386 / x32) system calls (security.md §7 "32-bit / x32 syscalls";
 * §3.3: CVE-2021-22555 used the compat path; isolate blocks "legacy architectures").
 * Attack: `int $0x80` with eax=20 (i386 getpid) from a 64-bit process enters the i386 compat
 * syscall table, which a filter written for x86-64 numbers does not describe.
 * With argument "x32": syscall 39|0x40000000 (x32 getpid) instead.
 * Safe outcome: the process is killed by SIGSYS before the instruction returns; the TEST
 * checks that (status "syscall_blocked", signal 31). If control comes back at all, the
 * probe prints UNSAFE with the value the kernel returned.
 */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    long ret;
    if (argc > 1 && strcmp(argv[1], "x32") == 0) {
        __asm__ volatile("syscall"
                         : "=a"(ret)
                         : "a"(0x40000000L | 39)
                         : "rcx", "r11", "memory");
        printf("UNSAFE: x32 syscall getpid returned %ld instead of SIGSYS\n", ret);
        return 1;
    }
    __asm__ volatile("int $0x80"
                     : "=a"(ret)
                     : "a"(20L)
                     : "r8", "r9", "r10", "r11", "memory");
    printf("UNSAFE: int $0x80 (i386 getpid) returned %ld instead of SIGSYS\n", ret);
    return 1;
}
