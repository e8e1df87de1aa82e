/* cgroupfs - cgroup filesystems (security.md §7 "CVE-2022-0492 check", "cgroupfs write";
 * §3.1 CVE-2022-0492 release_agent; §4.2 rootless runc with a writable /sys/fs/cgroup;
 * PaloAltoNetworks/can-ctr-escape-cve-2022-0492).
 * Attack: mount cgroup v1 (memory) and cgroup2; the same after unshare(user|mount|cgroup)
 * in a child, then open release_agent for writing; create a sub-cgroup (see below) and open
 * cgroup.procs / memory.max of our own cgroup for writing under /sys/fs/cgroup.
 * Safe outcome: all fail; /sys/fs/cgroup is absent or read-only.
 * Host safety: the direct mounts carry an unknown option (EINVAL comes only after the
 * permission check, so only EPERM/EACCES/ENOSYS count as safe); the unshare chain mounts
 * only inside its own private namespaces; files are opened for writing, never written;
 * the right to create a sub-cgroup is asked with faccessat(W_OK) (EROFS on a read-only
 * mount, EACCES without permission) rather than by creating one.
 */
#include "probe.h"
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>

static const char *target(void)
{
    struct stat st;
    return (stat("/tmp", &st) == 0 && S_ISDIR(st.st_mode)) ? "/tmp" : "/";
}

static void unshare_chain(void *arg)
{
    (void)arg;
    if (expect_fail("unshare(USER|NS|CGROUP)", unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP)))
        return;
    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    const char *t = target();
    if (expect_fail("then mount(cgroup, memory)", mount("cgroup", t, "cgroup", 0, "memory")))
        return;
    char ra[128];
    snprintf(ra, sizeof ra, "%s/release_agent", t);
    close_fd(expect_fail("then open(release_agent, O_WRONLY)", open(ra, O_WRONLY | O_CLOEXEC)));
}

static void try_cgroup_dir(const char *dir)
{
    char path[512], what[600];
    static const char *const files[] = {"cgroup.procs", "memory.max", "memory.limit_in_bytes",
                                        "release_agent", "cgroup.subtree_control"};
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (access(path, F_OK) != 0)
            continue;
        snprintf(what, sizeof what, "open(%s, O_WRONLY)", path);
        close_fd(expect_fail(what, open(path, O_WRONLY | O_CLOEXEC)));
    }
    /* mkdir of a sub-cgroup needs exactly this permission (and a writable mount); asking
     * instead of creating leaves the host's cgroup tree alone when run there by hand. */
    snprintf(what, sizeof what, "could mkdir in %s: faccessat(W_OK|X_OK)", dir);
    expect_fail(what, faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS));
}

int main(void)
{
    probe_init();
    const char *t = target();
    expect_denied("mount(cgroup, memory)", mount("cgroup", t, "cgroup", 0, "memory,sbxprobe_invalid"));
    expect_denied("mount(cgroup2)", mount("cgroup2", t, "cgroup2", 0, "sbxprobe_invalid"));
    in_child("unshare chain", unshare_chain, NULL);

    struct stat st;
    if (stat("/sys/fs/cgroup", &st) != 0) {
        note_safe("/sys/fs/cgroup: %s", en(errno));
        return probe_finish();
    }
    try_cgroup_dir("/sys/fs/cgroup");
    /* Our own cgroup(s), as /proc/self/cgroup names them ("N:controllers:/path"). */
    FILE *f = fopen("/proc/self/cgroup", "r");
    char line[512];
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *ctrl = strchr(line, ':');
        char *rel = ctrl ? strchr(ctrl + 1, ':') : NULL;
        if (!rel)
            continue;
        *rel++ = 0;
        ctrl++;
        char *comma = strchr(ctrl, ',');
        if (comma)
            *comma = 0;
        if (strncmp(ctrl, "name=", 5) == 0)
            ctrl += 5;
        char dir[600];
        size_t rl = strlen(rel);
        if (rl > 1 && rel[rl - 1] == '/')
            rel[rl - 1] = 0;
        if (strcmp(rel, "/") == 0)
            rel = "";
        if (*ctrl)
            snprintf(dir, sizeof dir, "/sys/fs/cgroup/%s%s", ctrl, rel);
        else
            snprintf(dir, sizeof dir, "/sys/fs/cgroup%s", rel);
        if (*rel || *ctrl)
            try_cgroup_dir(dir);
    }
    if (f)
        fclose(f);
    return probe_finish();
}
