#define _GNU_SOURCE
#include "proctitle.h"

#include <string.h>
#include <sys/prctl.h>

/* The kernel shows the bytes between the start of the first argument and the end of the
 * last one as the command line (exec laid them out back to back), every NUL in them a
 * separator; unless the last of them is no longer a NUL (setproctitle's mark), and then it
 * shows what is there up to the first NUL. */
static char *args;
static size_t args_len;

void proctitle_init(int argc, char **argv)
{
    if (argc < 1)
        return;
    args = argv[0];
    args_len = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) + 1 - argv[0]);
}

void proctitle_set(const char *name)
{
    size_t n = strlen(name);

    prctl(PR_SET_NAME, name, 0, 0, 0);
    if (!args || args_len < 2)
        return;
    if (n > args_len - 2)
        n = args_len - 2;
    memcpy(args, name, n);
    memset(args + n, 0, args_len - n);
    args[args_len - 1] = '.';
}
