/* setuid - a setuid-root binary inside the sandbox (security.md §7 "setuid binary";
 * moby TestRunNoNewPrivSetuid / contrib/nnp-test; nsjail and OCI noNewPrivileges).
 * The test installs a copy of this probe owned by the container's root with mode 4755.
 * Attack: exec a setuid-root file to gain uid 0 and capabilities; call setuid(0).
 * Safe outcome: euid == uid and egid == gid after exec (no_new_privs / nosuid), CapInh,
 * CapPrm, CapEff, CapBnd and CapAmb are all zero, and setuid(0) gains nothing: it fails
 * when we are not root, and when we already are uid 0 (single-id mapping) no capability
 * appears. The SAFE line says "suid=yes" when the file really has the setuid bit, so the
 * test can tell a real check from a vacuous one.
 */
#include "probe.h"
#include <sys/stat.h>

static void check_caps(const char *when)
{
    static const char *const fields[] = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"};
    for (int i = 0; i < 5; i++) {
        char v[64];
        if (status_field(fields[i], v, sizeof v) != 0)
            note_unsafe("%s missing from /proc/self/status", fields[i]);
        else if (strtoull(v, NULL, 16) != 0)
            note_unsafe("%s %s=%s", when, fields[i], v);
    }
}

int main(void)
{
    probe_init();
    struct stat st;
    int suid = stat("/proc/self/exe", &st) == 0 && (st.st_mode & S_ISUID);
    uid_t uid = getuid(), euid = geteuid();
    gid_t gid = getgid(), egid = getegid();
    note_safe("suid=%s owner=%u", suid ? "yes" : "no", (unsigned)st.st_uid);
    if (euid != uid)
        note_unsafe("euid %u != uid %u: the setuid bit took effect", (unsigned)euid, (unsigned)uid);
    else
        note_safe("uid=euid=%u", (unsigned)uid);
    if (egid != gid)
        note_unsafe("egid %u != gid %u", (unsigned)egid, (unsigned)gid);
    check_caps("after exec");

    long r = setuid(0);
    if (uid != 0) {
        expect_fail("setuid(0)", r);
    } else {
        note_safe("already uid 0 (single-id mapping); setuid(0)=%s", r == 0 ? "0" : en(errno));
    }
    if (geteuid() != euid && geteuid() == 0 && uid != 0)
        note_unsafe("euid became 0");
    check_caps("after setuid(0)");
    if (R->n_unsafe == 0)
        note_safe("no capabilities");
    return probe_finish();
}
