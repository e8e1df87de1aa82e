/* daemon - processes that outlive the run (security.md §7 "zombies / orphans"; DMOJ #318).
 * Attack: double-fork; the grandchild calls setsid(), ignores SIGHUP (and every other
 * signal that can be ignored), keeps stdout open, writes its pid there and sleeps 1000 s,
 * while the probe itself exits 0 at once.
 * The probe prints "SAFE: daemon started pid=<n>" (no judgement possible from inside);
 * the TEST then runs the "procs" probe in the same container and checks that only init
 * and that probe are left, and that this run ended "ok" rather than waiting for the
 * daemon's stdout to close.
 */
#include "probe.h"

int main(void)
{
    int pidpipe[2], gate[2];
    if (pipe(pidpipe) || pipe(gate))
        die("pipe: %s", en(errno));
    fflush(NULL);
    pid_t child = fork();
    if (child < 0)
        die("fork: %s", en(errno));
    if (child == 0) {
        pid_t grandchild = fork();
        if (grandchild < 0)
            _exit(3);
        if (grandchild == 0) {
            close(pidpipe[0]);
            close(pidpipe[1]);
            close(gate[1]);
            setsid();
            for (int sig = 1; sig < NSIG; sig++)
                if (sig != SIGKILL && sig != SIGSTOP)
                    signal(sig, SIG_IGN);
            char c;
            while (read(gate[0], &c, 1) > 0) /* wait until the probe has printed */
                ;
            close(gate[0]);
            dprintf(1, "daemon pid=%d\n", (int)getpid());
            for (int i = 0; i < 1000; i++)
                sleep(1);
            _exit(0);
        }
        if (write(pidpipe[1], &grandchild, sizeof grandchild) != sizeof grandchild)
            _exit(4);
        _exit(0);
    }
    close(pidpipe[1]);
    close(gate[0]);
    pid_t grandchild = 0;
    ssize_t n = read(pidpipe[0], &grandchild, sizeof grandchild);
    int st = 0;
    waitpid(child, &st, 0);
    if (n != sizeof grandchild || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die("could not start the daemon (child status %#x)", st);
    printf("SAFE: daemon started pid=%d\n", (int)grandchild);
    fflush(stdout);
    close(gate[1]);
    return 0;
}
