/* The seccomp filter's load, timed alone: for each program file given (raw struct
 * sock_filter arrays), `loads` times in turn with the others, fork a child that sets
 * no_new_privs and times its seccomp(SECCOMP_SET_MODE_FILTER) call, and print one line per
 * program: "<file> <instructions> <p10 ns> <median ns> <p90 ns>".
 * Usage: filterload LOADS FILE... */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: filterload LOADS FILE...\n");
        return 2;
    }
    int loads = atoi(argv[1]), n = argc - 2;
    if (loads < 1) {
        fprintf(stderr, "LOADS must be at least 1\n");
        return 2;
    }
    struct sock_fprog *progs = calloc(n, sizeof *progs);
    long long *took = calloc((size_t)n * loads, sizeof *took);
    /* Shared with each child: where it writes how long its load took. */
    long long *shared = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (!progs || !took || shared == MAP_FAILED) {
        perror("filterload");
        return 1;
    }
    for (int k = 0; k < n; k++) {
        FILE *f = fopen(argv[k + 2], "rb");
        static char buf[BPF_MAXINSNS * sizeof(struct sock_filter) + 1];
        size_t got = f ? fread(buf, 1, sizeof buf, f) : 0;
        if (!f || got == 0 || got % sizeof(struct sock_filter) || got >= sizeof buf) {
            fprintf(stderr, "%s: not a classic BPF program\n", argv[k + 2]);
            return 1;
        }
        fclose(f);
        progs[k].len = (unsigned short)(got / sizeof(struct sock_filter));
        progs[k].filter = malloc(got);
        if (!progs[k].filter) {
            perror("filterload");
            return 1;
        }
        memcpy(progs[k].filter, buf, got);
    }
    for (int i = 0; i < loads; i++) {
        for (int j = 0; j < n; j++) {
            int k = (i + j) % n;   /* each round starts with another program */
            pid_t child = fork();
            if (child < 0) {
                perror("fork");
                return 1;
            }
            if (child == 0) {
                if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
                    _exit(1);
                long long t0 = now_ns();
                if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &progs[k]))
                    _exit(1);
                *shared = now_ns() - t0;
                _exit(0);
            }
            int status;
            if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
                fprintf(stderr, "%s: the kernel refused the filter\n", argv[k + 2]);
                return 1;
            }
            took[(size_t)k * loads + i] = *shared;
        }
    }
    for (int k = 0; k < n; k++) {
        long long *t = took + (size_t)k * loads;
        qsort(t, loads, sizeof *t, by_value);
        printf("%s %u %lld %lld %lld\n", argv[k + 2], progs[k].len, t[loads / 10],
               t[loads / 2], t[loads * 9 / 10]);
    }
    return 0;
}
