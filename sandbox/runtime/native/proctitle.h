#ifndef SBX_PROCTITLE_H
#define SBX_PROCTITLE_H

/* What `ps` and /proc/PID/cmdline show of this process: its arguments as given by exec
 * (proctitle_init, from main's argv), or a name set later (proctitle_set). */
void proctitle_init(int argc, char **argv);

/* The process's name (comm, at most 15 bytes kept) and its whole command line become
 * `name`: a process that starts as one program and goes on as another (init, cloned from
 * its helper without an exec) shows what it is, not the arguments it was started with. */
void proctitle_set(const char *name);

#endif
