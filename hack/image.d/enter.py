#!/usr/bin/env python3
"""The last step of hack/image.d/container: chroot into the image root, take the
securityContext's user and capabilities, and exec the command with exactly the
given environment.

    enter.py ROOT PROFILE NAME=VALUE... -- CMD [ARGS...]

PROFILE: privileged (root, every capability), root-nocaps, or UID:GID. For the
last two the bounding and ambient sets are emptied and no_new_privs is set
before the exec, so the command starts with no capability even as root (a
root exec gets its permitted set from the bounding set) and can never gain one
(allowPrivilegeEscalation: false).
"""

import ctypes
import os
import sys

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LAST_CAP = 63

libc = ctypes.CDLL(None, use_errno=True)


def prctl(*args):
    if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}: {os.strerror(ctypes.get_errno())}")


def main():
    root, profile = sys.argv[1:3]
    rest = sys.argv[3:]
    sep = rest.index("--")
    env = dict(kv.split("=", 1) for kv in rest[:sep])
    cmd = rest[sep + 1:]
    os.chroot(root)
    os.chdir("/")
    if profile != "privileged":
        with open("/proc/self/status") as f:
            inheritable = next(l for l in f if l.startswith("CapInh:")).split()[1]
        if int(inheritable, 16) != 0:
            sys.exit(f"enter.py: inheritable capabilities {inheritable} would survive the exec")
        for cap in range(LAST_CAP + 1):
            try:
                prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
            except OSError:
                break  # past the kernel's last capability
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if profile != "root-nocaps":
            uid, gid = (int(x) for x in profile.split(":"))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
