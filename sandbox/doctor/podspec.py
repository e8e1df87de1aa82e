"""The parts of a pod spec that a nested rootless runtime needs, as fixes name them; each is
in deploy/kubernetes/sandboxd-statefulset.yaml, where the reasons are given."""

USER_NAMESPACE = "hostUsers: false"
SECCOMP = ("securityContext.seccompProfile {type: Localhost, localhostProfile: "
           "profiles/sandboxd.json} (deploy/kubernetes/seccomp/sandboxd.json, copied to "
           "/var/lib/kubelet/seccomp/profiles/ on each node) instead of RuntimeDefault, which "
           "refuses unshare and mount")
APPARMOR = ("securityContext.appArmorProfile {type: Localhost, localhostProfile: sandboxd} "
            "(deploy/kubernetes/apparmor/sandboxd, loaded with apparmor_parser on each node)")
PROC_MOUNT = "the container's securityContext.procMount: Unmasked (with hostUsers: false)"
ESCALATION = ("the container's securityContext.allowPrivilegeEscalation: true (newuidmap is "
              "setuid; the pod stays in its own user namespace with hostUsers: false)")
