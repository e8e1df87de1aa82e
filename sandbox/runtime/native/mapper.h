#ifndef SBX_MAPPER_H
#define SBX_MAPPER_H

/* `sbx-init mapper SOCKET UID_MAP GID_MAP`: see mapper.c. */
int mapper_main(int sock, const char *uid_map, const char *gid_map);

#endif
