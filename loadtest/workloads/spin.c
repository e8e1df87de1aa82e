/* CPU-bound workload: a fixed number of iterations of integer work (xorshift64 plus a
 * multiply-add chain), no system calls in the loop. argv[1] overrides the iteration count.
 * Prints the checksum so the compiler cannot drop the loop. */
#include <stdio.h>
#include <stdlib.h>

#define DEFAULT_ITERATIONS 300000000ULL

int main(int argc, char **argv) {
    unsigned long long n = argc > 1 ? strtoull(argv[1], NULL, 10) : DEFAULT_ITERATIONS;
    unsigned long long x = 88172645463325252ULL, acc = 0;
    for (unsigned long long i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc * 6364136223846793005ULL + (x | 1);
    }
    printf("%llu\n", acc);
    return 0;
}
