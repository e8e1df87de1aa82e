/* env - environment leakage (security.md §7 "env/secret leakage"; Judge0 issue #564).
 * Prints every environment variable, sorted, one per line as "ENV NAME=value"; no judgement:
 * the TEST compares the list with exactly the variables it declared. Exits 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static int cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(void)
{
    size_t n = 0;
    while (environ[n])
        n++;
    char **v = calloc(n + 1, sizeof *v);
    if (!v) {
        printf("ERROR: out of memory\n");
        return 2;
    }
    memcpy(v, environ, n * sizeof *v);
    qsort(v, n, sizeof *v, cmp);
    for (size_t i = 0; i < n; i++)
        printf("ENV %s\n", v[i]);
    return 0;
}
