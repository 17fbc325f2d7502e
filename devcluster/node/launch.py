"""Start one container of the process node: ``python -m devcluster.node.launch SPEC.json``.

A single-threaded process (mounts after fork in a threaded parent are unsafe) that, in order:
joins the pod's network namespace, unshares a mount and a UTS namespace (hostname = pod name),
builds the container's root on a tmpfs (the "image": the host folders the image table names, each
under an overlayfs whose writable layer is the container's own tmpfs), mounts /proc, /sys, a minimal
/dev with the termination-message file, the pod's volumes at their ``mountPath``s, chroots, drops to
the pod's ``runAsUser``/``runAsGroup``, asks for SIGKILL if the node agent dies, and execs the
container's command. Failures before exec exit 127 with a one-line reason on stderr (the container's
log), as a container runtime's start error would.

The spec (written by ``container.py``)::

    {"netns": "/run/netns/agl1-p0", "root": "/tmp/.../rootfs", "binds": ["/usr", ...],
     "mounts": [{"source": "/host/dir", "target": "/models/model", "readOnly": true}],
     "termination_log": {"host": "/tmp/.../termination-log", "path": "/dev/termination-log"},
     "read_only_root": true, "uid": 1000, "gid": 1000, "groups": [1000],
     "workdir": "/", "argv": ["autoglm-runtime", "serve"], "env": {"PATH": "..."}, "parent": 1234}
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
DEVICES = ["null", "zero", "full", "random", "urandom", "tty"]

libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def bind(source: str, target: str, read_only: bool) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(target):  # /etc/resolv.conf as a link elsewhere: the file goes in its place
            os.unlink(target)
        if not os.path.exists(target):
            open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def overlay(path: str, target: str, layer: str) -> None:
    """overlayfs, as a container runtime does: the host folder is the read-only lower layer; writes
    (and mount points for volumes) land in this container's own tmpfs."""
    upper, work = layer + "/upper" + path, layer + "/work" + path
    for d in (upper, work, target):
        os.makedirs(d, exist_ok=True)
    mount("overlay", target, "overlay", MS_NOSUID, f"lowerdir={path},upperdir={upper},workdir={work}")


def build_root(spec: dict) -> str:
    root, layer = spec["root"], spec["root"] + ".layer"
    for d in (root, layer):
        os.makedirs(d, exist_ok=True)
        mount("tmpfs", d, "tmpfs", MS_NOSUID, "mode=755")
    os.makedirs(root + "/tmp", mode=0o1777, exist_ok=True)
    os.chmod(root + "/tmp", 0o1777)
    # The image's folders and the pod's volumes, shallowest destination first (as runc sorts mounts),
    # the image first on a tie: a volume at /etc/demo lands inside the image's /etc, and an image
    # folder under a volume (this checkout under /tmp, with an emptyDir at /tmp) stays visible.
    mounts = [(p, None) for p in spec["binds"]] + [(m["target"], m) for m in spec["mounts"]]
    mounts.sort(key=lambda pm: (pm[0].rstrip("/").count("/"), pm[1] is not None))
    read_only = []
    for path, volume in mounts:
        target = root + path
        if volume is not None:
            bind(volume["source"], target, read_only=volume.get("readOnly", False))
        elif os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            overlay(path, target, layer)
            read_only.append(target)
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/sys", exist_ok=True)
    mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755")
    for d in DEVICES:
        if os.path.exists(f"/dev/{d}"):
            bind(f"/dev/{d}", f"{dev}/{d}", read_only=False)
    os.makedirs(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ]:
        os.symlink(target, f"{dev}/{name}")
    term = spec.get("termination_log")
    if term:
        bind(term["host"], root + term["path"], read_only=False)
    if spec.get("read_only_root"):
        for target in read_only:
            mount(None, target, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    return root


def main(argv: list[str]) -> None:
    with open(argv[1]) as f:
        spec = json.load(f)
    try:
        fd = os.open(spec["netns"], os.O_RDONLY)
        _check(libc.setns(fd, CLONE_NEWNET), "setns")
        os.close(fd)
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare mount and UTS namespaces")
        if spec.get("hostname"):
            name = spec["hostname"].encode()
            _check(libc.sethostname(name, len(name)), "sethostname")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        root = build_root(spec)
        os.chroot(root)
        os.chdir(spec.get("workdir") or "/")
        os.setgroups(spec.get("groups") or [spec["gid"]])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        # After the uid change (which clears it): die with the node agent, like a container with its runtime.
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
        if os.getppid() != spec["parent"]:
            sys.exit(137)
        env = spec["env"]
        argv0 = spec["argv"][0]
        path = argv0 if "/" in argv0 else shutil.which(argv0, path=env.get("PATH", "/usr/bin:/bin"))
        if not path:
            raise FileNotFoundError(f'exec: "{argv0}": executable file not found in $PATH')
        os.execve(path, spec["argv"], env)
    except OSError as exc:
        print(f"failed to start container: {exc}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv)
