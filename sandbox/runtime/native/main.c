/*
 * sbx-init's entry: the spawner execs this binary (by descriptor) as a helper, which makes a
 * container and clones its init (helper.c, init.c), or as the id mapper (mapper.c).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "helper.h"
#include "mapper.h"
#include "proctitle.h"

int main(int argc, char **argv)
{
    /* Before anything else: exec made this process dumpable again. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* Exec'd by descriptor, its name would be the descriptor's number: the caller names
     * it (the helper, the mapper; init names itself). */
    prctl(PR_SET_NAME, argv[0], 0, 0, 0);
    proctitle_init(argc, argv);
    if (argc == 5 && strcmp(argv[1], "mapper") == 0)
        return mapper_main(atoi(argv[2]), argv[3], argv[4]);
    if (argc == 6 && strcmp(argv[1], "helper") == 0)
        return helper_main(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    return 2;
}
