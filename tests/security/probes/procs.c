/* procs - what is running (security.md §7 "zombies / orphans", "ptrace other process":
 * host pids not visible). Lists every pid under /proc with its comm, sorted, one per line
 * as "PID <n> <comm>", then "SELF <n>" with its own pid. No judgement: the TEST checks that
 * only pid 1 (init) and this probe are there. Exits 0.
 */
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

int main(void)
{
    DIR *d = opendir("/proc");
    if (!d) {
        printf("ERROR: opendir(/proc) failed\n");
        return 2;
    }
    int pids[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096)
        if (isdigit((unsigned char)e->d_name[0]))
            pids[n++] = atoi(e->d_name);
    closedir(d);
    qsort(pids, (size_t)n, sizeof *pids, cmp);
    for (int i = 0; i < n; i++) {
        char path[64], comm[64] = "?";
        snprintf(path, sizeof path, "/proc/%d/comm", pids[i]);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fgets(comm, sizeof comm, f))
                comm[strcspn(comm, "\n")] = 0;
            fclose(f);
        }
        for (char *c = comm; *c; c++) /* keep "PID n comm" one token per field */
            if (isspace((unsigned char)*c))
                *c = '_';
        printf("PID %d %s\n", pids[i], comm[0] ? comm : "?");
    }
    printf("SELF %d\n", (int)getpid());
    return 0;
}
