/* state - what one run can leave for the next in the same container (issue #10, "state
 * between runs"). Two modes; no SAFE/UNSAFE judgement of its own (the TEST compares).
 *
 *   state plant WHAT  (files, ipc, daemon, init, root or all)
 *                 leaves everything it can: a file in every directory it may write (the
 *                 tmpfs mounts, /dev/shm, a writable root), a POSIX shm object, SysV shm,
 *                 message queue and semaphore set, a POSIX message queue, abstract and path
 *                 unix sockets held by a double-forked setsid daemon that ignores every
 *                 signal, and changes to pid 1 (init) that its later children would inherit:
 *                 rlimits, nice, scheduling policy, CPU affinity, I/O priority,
 *                 oom_score_adj; and (root) changes to the image's own files in a
 *                 writable root: a deleted file (an overlay whiteout), a directory
 *                 replaced (opaque), modes, an xattr, a file's contents.
 *                 Prints "PLANT <what> <outcome>" lines; exits 0.
 *   state check   prints "LEAK <what>: <detail>" for each thing of an earlier run it finds
 *                 (by name, and for SysV IPC any object at all), then "STATE <key> <value>"
 *                 lines: init's rlimits (/proc/1/limits) and scheduling, and the state
 *                 this run inherited (rlimits, nice, policy, affinity, I/O priority,
 *                 personality, umask, signal dispositions and mask, oom_score_adj, cwd,
 *                 environment), and the image files the root plant changes. A run after a plant must print what a run in a fresh
 *                 container prints. Exits 0.
 */
#include "probe.h"
#include <limits.h>
#include <stddef.h>
#include <mqueue.h>
#include <sched.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/xattr.h>

#define MARK "sbx-leak"
#define IPC_KEY 0x5b71ea
#define MQ_NAME "/" MARK "-mq"
#define SHM_NAME "/" MARK "-posix-shm"
#define ABSTRACT "\0" MARK "-abstract"
#define PATH_SOCK "/tmp/" MARK "-socket"
#define IOPRIO_WHO_PROCESS 1
#define IOPRIO_IDLE (3 << 13)

extern char **environ;
static int planted_files;

static const char *rlimit_names[RLIMIT_NLIMITS] = {
    "cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile",
    "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime",
};

/* ---------------------------------------------------------------- plant */

static void plant_files(const char *dir, int depth)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", MARK "-file");
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0666);
    if (fd >= 0) {
        if (write(fd, "left by an earlier run\n", 23) != 23)
            printf("PLANT file %s short-write\n", path);
        close(fd);
        planted_files++;
        printf("PLANT file %s ok\n", path);
    }
    if (depth > 12)
        return;
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
            !strncmp(e->d_name, MARK, strlen(MARK)))
            continue;
        snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name);
        if (!strcmp(path, "/proc") || !strcmp(path, "/sys"))
            continue;
        struct stat st;
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
            plant_files(path, depth + 1);
    }
    closedir(d);
}

static void plant_ipc(void)
{
    int id = shmget(IPC_KEY, 4096, IPC_CREAT | 0666);
    if (id >= 0) {
        char *p = shmat(id, NULL, 0);
        if (p != (void *)-1) {
            strcpy(p, "secret of an earlier run");
            shmdt(p);
        }
    }
    printf("PLANT sysv-shm %s\n", id >= 0 ? "ok" : en(errno));
    id = msgget(IPC_KEY, IPC_CREAT | 0666);
    struct { long type; char text[32]; } msg = {1, "secret of an earlier run"};
    printf("PLANT sysv-msg %s\n",
           id >= 0 && msgsnd(id, &msg, sizeof msg.text, IPC_NOWAIT) == 0 ? "ok" : en(errno));
    id = semget(IPC_KEY, 1, IPC_CREAT | 0666);
    printf("PLANT sysv-sem %s\n", id >= 0 && semctl(id, 0, SETVAL, 42) == 0 ? "ok" : en(errno));
    mqd_t q = mq_open(MQ_NAME, O_CREAT | O_RDWR, 0666, NULL);
    printf("PLANT mqueue %s\n",
           q != (mqd_t)-1 && mq_send(q, "secret", 6, 0) == 0 ? "ok" : en(errno));
    int fd = shm_open(SHM_NAME, O_CREAT | O_RDWR, 0666);
    printf("PLANT posix-shm %s\n", fd >= 0 && ftruncate(fd, 4096) == 0 ? "ok" : en(errno));
}

static int listen_unix(const char *name, size_t len)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    memcpy(a.sun_path, name, len);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + len) ||
        listen(fd, 1))
        return -1;
    return fd;
}

/* Double fork, setsid, every signal ignored, the sockets held open. */
static void plant_daemon(void)
{
    int ready[2];
    if (pipe(ready))
        die("pipe: %s", en(errno));
    fflush(NULL);
    pid_t child = fork();
    if (child == 0) {
        if (fork() == 0) {
            setsid();
            for (int sig = 1; sig < NSIG; sig++)
                if (sig != SIGKILL && sig != SIGSTOP)
                    signal(sig, SIG_IGN);
            int a = listen_unix(ABSTRACT, sizeof(ABSTRACT) - 1);
            int p = listen_unix(PATH_SOCK, sizeof(PATH_SOCK));
            char msg[64];
            int n = snprintf(msg, sizeof msg, "%s %s\n", a >= 0 ? "ok" : en(errno),
                             p >= 0 ? "ok" : en(errno));
            if (write(ready[1], msg, (size_t)n) != n)
                _exit(1);
            close(ready[1]);
            for (int fd = 0; fd < 3; fd++)
                close(fd);
            for (;;)
                pause();
        }
        _exit(0);
    }
    close(ready[1]);
    waitpid(child, NULL, 0);
    char buf[64] = "";
    ssize_t n = read(ready[0], buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("PLANT daemon-sockets %s", n > 0 ? buf : "none\n");
}

static void plant_init(void)
{
    struct rlimit small = {1 << 20, 1 << 20}, few = {16, 16};
    printf("PLANT init-rlimit-data %s\n", prlimit(1, RLIMIT_DATA, &small, NULL) ? en(errno) : "ok");
    printf("PLANT init-rlimit-nofile %s\n", prlimit(1, RLIMIT_NOFILE, &few, NULL) ? en(errno) : "ok");
    printf("PLANT init-nice %s\n", setpriority(PRIO_PROCESS, 1, 19) ? en(errno) : "ok");
    struct sched_param zero = {0};
    printf("PLANT init-policy %s\n", sched_setscheduler(1, SCHED_IDLE, &zero) ? en(errno) : "ok");
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    printf("PLANT init-affinity %s\n", sched_setaffinity(1, sizeof one, &one) ? en(errno) : "ok");
    printf("PLANT init-ioprio %s\n",
           syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 1, IOPRIO_IDLE) ? en(errno) : "ok");
    int fd = open("/proc/1/oom_score_adj", O_WRONLY | O_CLOEXEC);
    printf("PLANT init-oom_score_adj %s\n", fd >= 0 && write(fd, "1000", 4) == 4 ? "ok" : en(errno));
    close_fd(fd);
    printf("PLANT init-sigint %s\n", kill(1, SIGINT) ? en(errno) : "sent");
}

/* What the root plant changes and the check describes: files every test image has. */
static const char *root_paths[] = {"/etc", "/etc/hostname", "/etc/group", "/etc/passwd",
                                   "/root", "/bin"};

static void outcome(const char *what, int ok)
{
    printf("PLANT root-%s %s\n", what, ok ? "ok" : en(errno));
}

static void plant_root(void)
{
    outcome("delete", unlink("/etc/hostname") == 0);
    outcome("chmod-file", chmod("/etc/group", 0600) == 0);
    outcome("xattr", setxattr("/etc/passwd", "user." MARK, "1", 1, 0) == 0);
    int fd = open("/etc/passwd", O_WRONLY | O_APPEND | O_CLOEXEC);
    outcome("write", fd >= 0 && write(fd, MARK "\n", sizeof MARK) == (ssize_t)sizeof MARK);
    close_fd(fd);
    /* An empty image directory removed and made again: overlayfs marks it opaque. */
    outcome("opaque", rmdir("/root") == 0 && mkdir("/root", 0700) == 0);
    outcome("chmod-dir", chmod("/etc", 0700) == 0);
}

/* ---------------------------------------------------------------- check */

static void print_root(void)
{
    for (size_t i = 0; i < sizeof root_paths / sizeof *root_paths; i++) {
        const char *path = root_paths[i];
        struct stat st;
        if (lstat(path, &st) < 0) {
            printf("STATE root %s %s\n", path, en(errno));
            continue;
        }
        char names[1024] = "";
        ssize_t n = llistxattr(path, names, sizeof names - 1);
        for (ssize_t j = 0; j < n - 1; j++)
            if (!names[j])
                names[j] = ',';
        int entries = -1;
        DIR *d = S_ISDIR(st.st_mode) ? opendir(path) : NULL;
        if (d) {
            for (entries = 0; readdir(d);)
                entries++;
            closedir(d);
        }
        printf("STATE root %s mode=%o uid=%u gid=%u size=%lld entries=%d xattrs=%s\n",
               path, st.st_mode, st.st_uid, st.st_gid,
               S_ISDIR(st.st_mode) ? 0LL : (long long)st.st_size, entries,
               n > 0 ? names : "-");
    }
}

static void find_files(const char *dir, int depth)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char path[PATH_MAX];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name);
        if (!strcmp(path, "/proc") || !strcmp(path, "/sys"))
            continue;
        if (!strncmp(e->d_name, MARK, strlen(MARK)))
            printf("LEAK file: %s\n", path);
        struct stat st;
        if (depth < 12 && lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
            find_files(path, depth + 1);
    }
    closedir(d);
}

/* Any object in /proc/sysvipc/<kind>: each line after the header is one. */
static void find_sysv(const char *kind, int exists)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/sysvipc/%s", kind);
    FILE *f = fopen(path, "r");
    int objects = 0;
    if (f) {
        if (fgets(line, sizeof line, f))
            while (fgets(line, sizeof line, f))
                objects++;
        fclose(f);
    }
    if (exists || objects)
        printf("LEAK sysv-%s: %d object(s), key %s\n", kind, objects,
               exists ? "found" : "absent");
}

static void find_socket(const char *what, const char *name, size_t len)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    memcpy(a.sun_path, name, len);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + len) == 0)
        printf("LEAK %s: connected\n", what);
    close_fd(fd);
}

static void find_processes(void)
{
    DIR *d = opendir("/proc");
    if (!d)
        die("opendir(/proc): %s", en(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        int pid = atoi(e->d_name);
        if (pid <= 1 || pid == getpid())
            continue;
        char path[64], comm[64] = "?";
        snprintf(path, sizeof path, "/proc/%d/comm", pid);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fgets(comm, sizeof comm, f))
                comm[strcspn(comm, "\n")] = 0;
            fclose(f);
        }
        printf("LEAK process: %d %s\n", pid, comm);
    }
    closedir(d);
}

static void print_file(const char *key, const char *path)
{
    char buf[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (n < 0) {
        printf("STATE %s %s\n", key, en(errno));
        close_fd(fd);
        return;
    }
    buf[n] = 0;
    close(fd);
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        while (*line == ' ')
            line++;
        printf("STATE %s %s\n", key, line);
    }
}

static void print_scheduling(const char *who, pid_t pid)
{
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, (id_t)pid);
    printf("STATE %s-nice %d %s\n", who, nice, errno ? en(errno) : "");
    printf("STATE %s-policy %d\n", who, sched_getscheduler(pid));
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(pid, sizeof set, &set) == 0)
        printf("STATE %s-cpus %d\n", who, CPU_COUNT(&set));
    else
        printf("STATE %s-cpus %s\n", who, en(errno));
    printf("STATE %s-ioprio %ld\n", who, syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, pid));
}

static void print_rlimits(void)
{
    for (int r = 0; r < RLIMIT_NLIMITS; r++) {
        struct rlimit rl;
        getrlimit(r, &rl);
        printf("STATE self-rlimit-%s %llu %llu\n", rlimit_names[r],
               (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max);
    }
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void check(void)
{
    find_files("/", 0);
    errno = 0;
    find_sysv("shm", shmget(IPC_KEY, 0, 0) >= 0 || errno != ENOENT);
    errno = 0;
    find_sysv("msg", msgget(IPC_KEY, 0) >= 0 || errno != ENOENT);
    errno = 0;
    find_sysv("sem", semget(IPC_KEY, 0, 0) >= 0 || errno != ENOENT);
    mqd_t q = mq_open(MQ_NAME, O_RDONLY);
    if (q != (mqd_t)-1 || errno != ENOENT)
        printf("LEAK mqueue: %s\n", q != (mqd_t)-1 ? "opened" : en(errno));
    int fd = shm_open(SHM_NAME, O_RDONLY, 0);
    if (fd >= 0 || errno != ENOENT)
        printf("LEAK posix-shm: %s\n", fd >= 0 ? "opened" : en(errno));
    close_fd(fd);
    find_socket("abstract-socket", ABSTRACT, sizeof(ABSTRACT) - 1);
    find_socket("path-socket", PATH_SOCK, sizeof(PATH_SOCK));
    find_processes();
    print_root();

    print_scheduling("init", 1);
    print_file("init-oom_score_adj", "/proc/1/oom_score_adj");
    print_file("init-limits", "/proc/1/limits");
    print_scheduling("self", 0);
    print_rlimits();
    print_file("self-oom_score_adj", "/proc/self/oom_score_adj");
    printf("STATE self-personality %#x\n", personality(0xffffffff));
    mode_t mask = umask(0);
    umask(mask);
    printf("STATE self-umask %04o\n", mask);
    const char *fields[] = {"SigBlk", "SigIgn", "SigCgt", "NoNewPrivs", "Seccomp",
                            "CapEff", "CapBnd"};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
        char v[128] = "?";
        status_field(fields[i], v, sizeof v);
        printf("STATE self-%s %s\n", fields[i], v);
    }
    char cwd[PATH_MAX];
    printf("STATE self-cwd %s\n", getcwd(cwd, sizeof cwd) ? cwd : en(errno));
    int n = 0;
    while (environ[n])
        n++;
    char **env = calloc((size_t)n + 1, sizeof *env);
    memcpy(env, environ, (size_t)n * sizeof *env);
    qsort(env, (size_t)n, sizeof *env, cmp_str);
    for (int i = 0; i < n; i++)
        printf("STATE self-env %s\n", env[i]);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "plant")) {
        const char *what = argv[2];
        int all = !strcmp(what, "all");
        if (all || !strcmp(what, "files")) {
            plant_files("/", 0);
            printf("PLANT files %d\n", planted_files);
        }
        if (all || !strcmp(what, "ipc"))
            plant_ipc();
        if (all || !strcmp(what, "daemon")) {
            plant_daemon();
            /* A plain child left behind too. */
            fflush(NULL);
            if (fork() == 0)
                for (;;)
                    pause();
        }
        if (all || !strcmp(what, "init"))
            plant_init();
        if (all || !strcmp(what, "root"))
            plant_root();
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "check")) {
        check();
        return 0;
    }
    die("usage: state plant files|ipc|daemon|init|root|all, or state check");
}
