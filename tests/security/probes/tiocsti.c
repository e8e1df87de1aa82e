/* tiocsti - terminal input injection (security.md §7 "TIOCSTI / TIOCLINUX"; CVE-2017-5226,
 * CVE-2019-10063 / CVE-2019-7303: a filter that compares all 64 bits of the ioctl command
 * is bypassed by setting bit 32, which the kernel ignores).
 * Attack: push a character into a terminal's input queue with ioctl(TIOCSTI), both through
 * ioctl() and through the raw syscall with cmd TIOCSTI|1<<32; also TIOCLINUX (console
 * selection paste). Targets: fd 0 and /dev/tty (whatever terminal the run inherited), and
 * a fresh pty made our controlling terminal in a new session (where the kernel itself would
 * allow TIOCSTI, so only the filter stands in the way). /dev/tty0 and /dev/console only get
 * the harmless TIOCL_GETSHIFTSTATE.
 * Safe outcome: every ioctl fails (or there is no terminal to reach at all).
 * The injected byte is '#': typed at a shell prompt it only starts a comment.
 */
#include "probe.h"
#include <sys/ioctl.h>
#include <termios.h>

#define SBX_TIOCL_GETSHIFTSTATE 6

static void inject(int fd, const char *name)
{
    char c = '#';
    char what[96];
    snprintf(what, sizeof what, "ioctl(%s, TIOCSTI)", name);
    expect_fail(what, ioctl(fd, TIOCSTI, &c));
    snprintf(what, sizeof what, "ioctl(%s, TIOCSTI|1<<32)", name);
    expect_fail(what, syscall(SYS_ioctl, fd, (unsigned long)TIOCSTI | (1UL << 32), &c));
    char sub = SBX_TIOCL_GETSHIFTSTATE;
    snprintf(what, sizeof what, "ioctl(%s, TIOCLINUX)", name);
    expect_fail(what, ioctl(fd, TIOCLINUX, &sub));
}

static void pty_attack(void *arg)
{
    (void)arg;
    signal(SIGHUP, SIG_IGN); /* closing our controlling pty at the end hangs it up */
    if (setsid() < 0) /* a new session without a controlling terminal */
        die("setsid: %s", en(errno));
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0)
        m = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) {
        note_safe("no pty to open (%s)", en(errno));
        return;
    }
    char *name = (grantpt(m) == 0 && unlockpt(m) == 0) ? ptsname(m) : NULL;
    int s = name ? open(name, O_RDWR | O_CLOEXEC) : -1; /* becomes the controlling tty */
    if (s < 0) {
        note_safe("pty slave not openable (%s)", en(errno));
        close(m);
        return;
    }
    ioctl(s, TIOCSCTTY, 0);
    inject(s, "pty");
    close(s);
    close(m);
}

static void console_ops(void)
{
    static const char *const consoles[] = {"/dev/tty0", "/dev/console"};
    for (int i = 0; i < 2; i++) {
        int fd = open(consoles[i], O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            note_safe("open(%s)=%s", consoles[i], en(errno));
            continue;
        }
        char sub = SBX_TIOCL_GETSHIFTSTATE, what[64];
        snprintf(what, sizeof what, "ioctl(%s, TIOCLINUX)", consoles[i]);
        expect_fail(what, ioctl(fd, TIOCLINUX, &sub));
        close(fd);
    }
}

int main(void)
{
    probe_init();
    inject(0, "fd0");
    int tty = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (tty < 0) {
        note_safe("open(/dev/tty)=%s", en(errno));
    } else {
        inject(tty, "/dev/tty");
        close(tty);
    }
    console_ops();
    in_child("pty", pty_attack, NULL);
    return probe_finish();
}
