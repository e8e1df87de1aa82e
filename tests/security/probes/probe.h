/* probe.h - helpers shared by the security probes (header only, no .c of its own).
 *
 * Contract of every judging probe: try the attack, then print ONE line and exit:
 *   "SAFE: <what happened>"    exit 0  the safe outcome holds
 *   "UNSAFE: <what happened>"  exit 1  it does not
 *   "ERROR: <why>"             exit 2  the probe itself could not run
 *
 * Findings are collected in a MAP_SHARED page so that forked children (used to keep an
 * attempt that might succeed from changing the rest of the probe) report into the same
 * line. Only the top-level process prints; children leave with _exit().
 *
 * Host safety: the probes are also run directly on the host as root to check they work.
 * Every attempt is therefore harmless when it succeeds, or uses arguments that the kernel
 * only rejects AFTER its permission check (checked with expect_denied, which accepts only
 * EPERM/EACCES/ENOSYS: any other error means the call got past seccomp and capabilities).
 */
#ifndef SBX_PROBE_H
#define SBX_PROBE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROBE_TEXT 3500
#define PROBE_FN static __attribute__((unused))

struct probe_report {
    int n_safe, n_unsafe;
    char safe[PROBE_TEXT];
    char unsafe[PROBE_TEXT];
};

static __attribute__((unused)) struct probe_report *R;

PROBE_FN const char *en(int e)
{
    const char *s = strerrorname_np(e);
    return s ? s : "E?";
}

PROBE_FN void die(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(1, "ERROR: %s\n", buf);
    _exit(2);
}

PROBE_FN void probe_init(void)
{
    R = mmap(NULL, sizeof *R, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (R == MAP_FAILED)
        die("mmap: %s", en(errno));
    memset(R, 0, sizeof *R);
}

PROBE_FN void add_note(char *buf, int *n, const char *fmt, va_list ap)
{
    size_t len = strlen(buf);
    if (len + 8 >= PROBE_TEXT)
        return;
    if (*n > 0)
        len += (size_t)snprintf(buf + len, PROBE_TEXT - len, "; ");
    vsnprintf(buf + len, PROBE_TEXT - len, fmt, ap);
    for (char *p = buf + len; *p; p++) /* keep the report on one line */
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    (*n)++;
}

PROBE_FN void note_safe(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_note(R->safe, &R->n_safe, fmt, ap);
    va_end(ap);
}

PROBE_FN void note_unsafe(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_note(R->unsafe, &R->n_unsafe, fmt, ap);
    va_end(ap);
}

/* Valid, harmless arguments: any failure is the safe outcome. */
PROBE_FN long expect_fail(const char *what, long rc)
{
    int e = errno;
    if (rc == -1)
        note_safe("%s=%s", what, en(e));
    else
        note_unsafe("%s succeeded (%ld)", what, rc);
    errno = e;
    return rc;
}

/* Deliberately invalid arguments that the kernel only rejects after its permission
 * check: only a permission-type error is safe. */
PROBE_FN long expect_denied(const char *what, long rc)
{
    int e = errno;
    if (rc == -1 && (e == EPERM || e == EACCES || e == ENOSYS))
        note_safe("%s=%s", what, en(e));
    else if (rc == -1)
        note_unsafe("%s=%s (got past the permission check)", what, en(e));
    else
        note_unsafe("%s succeeded (%ld)", what, rc);
    errno = e;
    return rc;
}

PROBE_FN void close_fd(long fd)
{
    if (fd >= 0)
        close((int)fd);
}

/* Run fn in a forked child (so a successful attack cannot change the rest of the probe).
 * A child killed by SIGSYS counts as blocked (seccomp kill action). */
PROBE_FN void in_child(const char *what, void (*fn)(void *), void *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        die("fork for %s: %s", what, en(errno));
    if (pid == 0) {
        fn(arg);
        _exit(0);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            die("waitpid for %s: %s", what, en(errno));
    if (WIFEXITED(st) && WEXITSTATUS(st) == 2)
        _exit(2); /* the child already printed ERROR */
    if (WIFSIGNALED(st)) {
        if (WTERMSIG(st) == SIGSYS)
            note_safe("%s: killed by SIGSYS", what);
        else
            die("%s: child killed by signal %d", what, WTERMSIG(st));
    }
}

PROBE_FN int probe_finish(void)
{
    fflush(NULL);
    if (R->n_unsafe) {
        printf("UNSAFE: %s\n", R->unsafe);
        return 1;
    }
    printf("SAFE: %s\n", R->n_safe ? R->safe : "nothing to report");
    return 0;
}

/* Value of a "Name:\tvalue" line of /proc/self/status, or -1 (as text: NULL). */
PROBE_FN int status_field(const char *name, char *out, size_t outlen)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[512];
    size_t nl = strlen(name);
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, nl) == 0 && line[nl] == ':') {
            char *v = line + nl + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            v[strcspn(v, "\n")] = 0;
            snprintf(out, outlen, "%s", v);
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

/* Whether capability `bit` is in CapEff. */
PROBE_FN int has_cap(int bit)
{
    char v[64];
    if (status_field("CapEff", v, sizeof v) != 0)
        return 0;
    return (int)((strtoull(v, NULL, 16) >> bit) & 1);
}

/* Safe when `path` cannot be opened or reads as empty; unsafe when it yields bytes. */
PROBE_FN void expect_no_data(const char *path)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        note_safe("%s: %s", path, en(errno));
        return;
    }
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0)
        note_unsafe("read %zd bytes from %s", n, path);
    else if (n == 0)
        note_safe("%s: empty", path);
    else
        note_safe("%s: read %s", path, en(errno));
    close(fd);
}

/* Entries of a directory other than . and ..; -1 (errno set) when it cannot be listed. */
PROBE_FN int count_entries(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    int err = errno;
    closedir(d);
    errno = err;
    return n;
}

/* Safe when `path` cannot be listed or lists nothing. */
PROBE_FN void expect_no_entries(const char *path)
{
    int n = count_entries(path);
    if (n < 0)
        note_safe("%s: %s", path, en(errno));
    else if (n > 0)
        note_unsafe("%s lists %d entries", path, n);
    else
        note_safe("%s: no entries", path);
}

#endif
