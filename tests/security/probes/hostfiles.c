/* hostfiles - host files visible inside (security.md §7 "read host files",
 * "runtime/daemon sockets"; runc mask.bats).
 * Attack: read host files the test names, connect to host sockets, find host top-level dirs.
 * Usage: hostfiles [PATH | PATH=TOKEN | --top=NAME]...
 *   PATH        must be absent or unreadable (a directory: not listable; a socket: not
 *               connectable);
 *   PATH=TOKEN  as PATH, except that a readable file is fine when its first 64 KiB do not
 *               contain TOKEN (the image's own /etc/shadow, say, is not the host's);
 *   --top=NAME  /NAME must not exist (a host top-level directory the image does not have).
 * Safe outcome: all of the above hold.
 */
#include "probe.h"
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

static void check_path(const char *path, const char *token)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        note_safe("%s: %s", path, en(errno));
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        expect_no_entries(path);
        return;
    }
    if (S_ISSOCK(st.st_mode)) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            note_unsafe("%s: connected to the socket", path);
        else
            note_safe("%s: socket, connect %s", path, en(errno));
        close_fd(fd);
        return;
    }
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        note_safe("%s: open %s", path, en(errno));
        return;
    }
    static char buf[65536];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 0)
        note_safe("%s: read %s", path, en(errno));
    else if (!token)
        note_unsafe("%s: readable (%zd bytes)", path, n);
    else if (memmem(buf, (size_t)n, token, strlen(token)))
        note_unsafe("%s: readable and holds the host's content", path);
    else
        note_safe("%s: readable but not the host's file", path);
}

int main(int argc, char **argv)
{
    probe_init();
    if (argc < 2)
        die("usage: hostfiles [PATH | PATH=TOKEN | --top=NAME]...");
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--top=", 6) == 0) {
            char path[512];
            struct stat st;
            snprintf(path, sizeof path, "/%s", argv[i] + 6);
            if (lstat(path, &st) == 0)
                note_unsafe("%s exists", path);
            else
                note_safe("%s: %s", path, en(errno));
            continue;
        }
        char *eq = strchr(argv[i], '=');
        if (eq)
            *eq++ = 0;
        check_path(argv[i], eq);
    }
    return probe_finish();
}
