/*
 * Init's entry, which the helper's (helper.c) clone runs as pid 1 of the container.
 */
#ifndef SBX_INIT_H
#define SBX_INIT_H

#include "mp.h"

/* Serve the container on `control` with `config` (never freed: init keeps pointers into
 * it), a map: started_ns, seccomp_bpf, last_cap, caps, set_groups, init_id ([uid, gid] or
 * nil), mounts (its part of the mount plan: mounts.h), root, files, resettable and writable
 * (scratch.h). `skeleton`: the helper mounted the root with the writable message's skeleton
 * layer on top. Returns when the control socket closes. */
int init_main(int control, const struct mp_value *config, int skeleton);

#endif
