/* keyring - the kernel keyring (security.md §7 "keyring"; §1.4: keyrings are not namespaced).
 * Attack: keyctl, add_key and request_key reach keys shared across every sandbox of the same
 * host uid (a cross-sandbox channel and an old source of kernel bugs).
 * Safe outcome: all three fail. add_key targets the process keyring (gone with the probe);
 * request_key asks for a key that does not exist, so ENOKEY would mean the kernel searched
 * the keyrings: only EPERM/EACCES/ENOSYS count as safe there.
 */
#include "probe.h"
#include <linux/keyctl.h>

int main(void)
{
    probe_init();
    expect_fail("keyctl(GET_KEYRING_ID, session)",
                syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1));
    expect_fail("add_key(user)",
                syscall(SYS_add_key, "user", "sbxprobe", "x", 1, KEY_SPEC_PROCESS_KEYRING));
    expect_denied("request_key(user)", syscall(SYS_request_key, "user", "sbxprobe:missing", NULL,
                                               KEY_SPEC_PROCESS_KEYRING));
    return probe_finish();
}
