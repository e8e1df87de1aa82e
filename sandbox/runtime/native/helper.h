#ifndef SBX_HELPER_H
#define SBX_HELPER_H

/* `sbx-init helper LINK CONTROL USERNS HOST_NETWORK`: see helper.c. */
int helper_main(int link, int control, int userns, int host_network);

#endif
