/* fds - leaked file descriptors and working directory (security.md §7 "leaked fds / cwd";
 * §4.2 CVE-2024-21626: a leaked host directory fd or a cwd outside the root escapes it;
 * runc create.bats "detect fd leak", runc verifyCwd).
 * Attack: look for inherited descriptors beyond stdio (a directory fd, a control socket),
 * and for a working directory outside the container's root.
 * Safe outcome: only fds 0, 1, 2 are open (the directory fd used for listing aside), none of
 * them is a directory, getcwd() works and does not start with "(unreachable)", and
 * /proc/self/root is "/".
 */
#include "probe.h"
#include <dirent.h>
#include <limits.h>
#include <sys/stat.h>

int main(void)
{
    probe_init();
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        die("opendir(/proc/self/fd): %s", en(errno));
    int self = dirfd(d), seen = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd == self)
            continue;
        char link[64], target[PATH_MAX] = "?";
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n >= 0)
            target[n] = 0;
        struct stat st;
        if (fd > 2)
            note_unsafe("extra fd %d -> %s", fd, target);
        else if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode))
            note_unsafe("fd %d is a directory (%s)", fd, target);
        else
            seen++;
    }
    closedir(d);
    note_safe("%d stdio fds, nothing else", seen);

    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd))
        note_unsafe("getcwd failed: %s (cwd outside the root?)", en(errno));
    else if (strncmp(cwd, "(unreachable)", 13) == 0)
        note_unsafe("cwd is outside the root: %s", cwd);
    else
        note_safe("cwd=%s", cwd);

    char root[PATH_MAX];
    ssize_t n = readlink("/proc/self/root", root, sizeof root - 1);
    if (n < 0)
        note_safe("readlink(/proc/self/root)=%s", en(errno));
    else if ((root[n] = 0), strcmp(root, "/") != 0)
        note_unsafe("/proc/self/root -> %s", root);
    return probe_finish();
}
