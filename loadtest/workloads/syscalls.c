/* Syscall-heavy workload: per iteration, getppid through syscall() (never cached by libc)
 * and a 1-byte read from /dev/zero; clock_gettime is left out, being a vDSO call.
 * argv[1] overrides the iteration count. Exits 1 if a call fails. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DEFAULT_ITERATIONS 2000000L

int main(int argc, char **argv) {
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : DEFAULT_ITERATIONS;
    int fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/zero");
        return 1;
    }
    long sum = 0;
    char c;
    for (long i = 0; i < n; i++) {
        sum += syscall(SYS_getppid);
        if (read(fd, &c, 1) != 1) {
            perror("read /dev/zero");
            return 1;
        }
    }
    printf("%ld\n", sum);
    return 0;
}
