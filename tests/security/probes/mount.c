/* mount - the mount family (security.md §7 "mount family", "remount proc / new mount";
 * §3.1 CVE-2022-0185 is reached through fsopen/fsconfig).
 * Attack: mount tmpfs and proc, bind-mount, umount2 /proc, pivot_root, chroot, setns into a
 * namespace, and the new mount API (fsopen, fsconfig, fsmount, fspick, open_tree,
 * move_mount, mount_setattr).
 * Safe outcome: all fail. Calls whose success would change the host when this probe is run
 * there by hand use arguments the kernel rejects only after its permission check (bad
 * mount options, missing paths, fd -1), and then only EPERM/EACCES/ENOSYS count as safe.
 */
#include "probe.h"
#include <sched.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/stat.h>

#define SBX_OPEN_TREE_CLONE 1
#define SBX_MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#define SBX_FSCONFIG_CMD_CREATE 6

struct mount_attr_v0 {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

int main(void)
{
    probe_init();
    struct stat st;
    /* An existing target, so the path lookup (done before the permission check) succeeds. */
    const char *target = (stat("/tmp", &st) == 0 && S_ISDIR(st.st_mode)) ? "/tmp" : "/";
    const char *missing = "/nonexistent-sbxprobe";

    expect_denied("mount(tmpfs)", mount("none", target, "tmpfs", 0, "size=sbxprobe-invalid"));
    expect_denied("mount(proc)", mount("proc", target, "proc", 0, "hidepid=sbxprobe-invalid"));
    expect_denied("mount(MS_BIND)", mount(missing, target, NULL, MS_BIND, NULL));
    /* MNT_EXPIRE|MNT_DETACH is refused (EINVAL) right after the permission check. */
    expect_denied("umount2(/proc)", umount2("/proc", MNT_EXPIRE | MNT_DETACH));
    expect_denied("pivot_root", syscall(SYS_pivot_root, missing, missing));
    expect_fail("chroot(/)", chroot("/"));

    static const char *const ns[][2] = {{"/proc/self/ns/net", "setns(net)"},
                                        {"/proc/self/ns/mnt", "setns(mnt)"}};
    for (int i = 0; i < 2; i++) {
        int fd = open(ns[i][0], O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            note_safe("open(%s)=%s", ns[i][0], en(errno));
        else
            expect_fail(ns[i][1], setns(fd, 0));
        close_fd(fd);
    }

    close_fd(expect_fail("fsopen(tmpfs)", syscall(SYS_fsopen, "tmpfs", 1 /* CLOEXEC */)));
    expect_denied("fsconfig(-1)", syscall(SYS_fsconfig, -1, SBX_FSCONFIG_CMD_CREATE, NULL, NULL, 0));
    expect_denied("fsmount(-1)", syscall(SYS_fsmount, -1, 0, 0));
    close_fd(expect_fail("fspick(/)", syscall(SYS_fspick, AT_FDCWD, "/", 1 /* CLOEXEC */)));
    close_fd(expect_fail("open_tree(/, CLONE)",
                         syscall(SYS_open_tree, AT_FDCWD, "/", SBX_OPEN_TREE_CLONE | O_CLOEXEC)));
    expect_denied("move_mount(-1)", syscall(SYS_move_mount, -1, "", AT_FDCWD, target,
                                            SBX_MOVE_MOUNT_F_EMPTY_PATH));
    struct mount_attr_v0 attr = {.attr_set = 1ULL << 62}; /* unknown flag: EINVAL after may_mount */
    expect_denied("mount_setattr(/)",
                  syscall(SYS_mount_setattr, AT_FDCWD, "/", 0, &attr, sizeof attr));
    return probe_finish();
}
