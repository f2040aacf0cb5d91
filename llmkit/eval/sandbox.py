"""Run untrusted generated Python (HumanEval completions) in a limited subprocess, and pass@k.

    res = run_code(prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n", timeout=10)
    res.passed, res.status, res.detail            # True/False, "passed"|"failed"|"timeout"|"error", text
    pass_at_k(n=10, c=3, k=1)                     # 0.3

What `run_code` does, layer by layer (each layer that cannot be applied on this system is skipped silently;
`SandboxResult.layers` says which ones were in force for a run):
- Process: a fresh `python -I -B` (isolated mode: no user site, no PYTHON* variables, no current folder on
  sys.path, no .pyc written) in a new session, so a process group of its own; stdin is /dev/null; the
  environment is minimal (PATH, LANG, HOME and TMPDIR pointing into the run's folder, one BLAS/OpenMP
  thread). Wall-clock timeout: the whole group gets SIGKILL when it expires, and again when the program ends
  (nothing it forked outlives it).
- Folder: a fresh temporary folder is the working folder, HOME and TMPDIR; it is deleted afterwards.
- Limits (set by the child itself before the program is read): RLIMIT_AS = memory_mb, RLIMIT_CPU = timeout
  + 1 s, RLIMIT_FSIZE (64 MiB per file, which also caps what the program prints), RLIMIT_CORE = 0, and for a
  non-root user RLIMIT_NPROC = that user's current threads + 64 (root ignores RLIMIT_NPROC).
- Network (OS): a new network namespace (no interface but a down loopback) via unshare(CLONE_NEWNET), or
  CLONE_NEWUSER|CLONE_NEWNET when unprivileged user namespaces are allowed; Landlock (Linux >= 6.7, ABI 4)
  denies every TCP bind and connect.
- Files (OS): Landlock (Linux >= 5.13) allows creating, writing, truncating, renaming and deleting only
  beneath the run's folder (and writing /dev/null); reading stays allowed everywhere. Landlock ABI 6 also
  stops signals to processes outside the sandbox.
- In-process guard (as human-eval's `reliability_guard`, after the set-up; `guard=False` leaves it out, for
  tests of the OS layers): creating sockets, connecting and resolving names raise; `open`, `io.open`,
  `os.open` in a write mode and os.remove/unlink/rmdir/rename/replace/mkdir/link/symlink/truncate/chmod/utime
  (so shutil.rmtree/move too) refuse paths outside the folder (human-eval disables removal everywhere, which
  breaks `tempfile`); os.kill/killpg/fork/forkpty/exec*/spawn*/posix_spawn*/system/popen/setsid/setpgid/
  chdir/chown/chroot/setuid, subprocess.Popen, shutil.chown, `import ctypes/resource/psutil/
  _posixsubprocess` and exit()/quit()/help() are disabled.

What it does not protect against: it is not a security boundary against a determined attacker. The
in-process guard is plain Python and can be walked around (`_io.FileIO`, gc/frame introspection); without
Landlock and a network namespace (older kernels, seccomp policies of some container runtimes) nothing at the
OS level stops writes to files the user may write, UDP traffic, or a process that leaves the group with
setsid(). Reading files the user can read (and printing them) is allowed. Disk use inside the folder is only
capped per file. A program that finds the harness's status descriptor can forge a pass. For untrusted code at
scale use a container or VM (gVisor, Firecracker) around the whole evaluation.

Notable choices
- Limits, namespaces and Landlock are applied by the child (the harness in `_CHILD`) before it reads the
  program, not in a `preexec_fn`: `preexec_fn` is not safe when the parent has threads, and tasks run several
  sandboxes from a thread pool. Nothing the program does can happen before they are in place.
- The result is "passed" only when the program ran to its end: the harness writes a marker after `exec`
  returns, so an early os._exit(0) in the program is a failure.
- "failed" = the program ran and did not pass (an exception, MemoryError at the memory limit, a signal);
  "timeout" = killed by the wall clock or the CPU limit; "error" = the sandbox itself could not start it.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmkit.errors import LlmkitError

Status = Literal["passed", "failed", "timeout", "error"]
FILE_LIMIT = 64 << 20  # RLIMIT_FSIZE: bytes per file (and of the captured output)
DETAIL_CHARS = 600  # the tail of the program's output kept in SandboxResult.detail


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: Status
    detail: str  # "" when passed; else the reason (the tail of the output: traceback, signal, timeout)
    layers: tuple[str, ...] = ()  # the protections in force for this run (see the module docstring)


# The child: limits and isolation first, then the in-process guard, then the program. argv: work folder,
# program file, status file, memory bytes, CPU seconds, file-size bytes, "1" to apply the in-process guard.
_CHILD = r'''
import builtins, io, os, resource, sys, traceback
work, program, status_path = sys.argv[1], sys.argv[2], sys.argv[3]
mem, cpu, fsize, use_guard = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
layers = []

def limit(res, value, extra=0):
    soft, hard = resource.getrlimit(res)
    top = value + extra
    if hard != resource.RLIM_INFINITY:
        value, top = min(value, hard), min(top, hard)
    try:
        resource.setrlimit(res, (value, top))
        return True
    except (ValueError, OSError):
        return False

ok = [limit(resource.RLIMIT_AS, mem), limit(resource.RLIMIT_CPU, cpu, 1), limit(resource.RLIMIT_FSIZE, fsize),
      limit(resource.RLIMIT_CORE, 0)]
if all(ok):
    layers.append("rlimits")
if os.getuid() != 0:
    try:
        threads = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        st = dict(line.split(":", 1) for line in f if ":" in line)
                except OSError:
                    continue
                if int(st["Uid"].split()[0]) == os.getuid():
                    threads += int(st["Threads"])
        if limit(resource.RLIMIT_NPROC, threads + 64):
            layers.append("nproc")
    except Exception:
        pass
status = open(status_path, "w")

import ctypes
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
    layers.append("netns")

def landlock():
    sc = libc.syscall
    sc.restype = ctypes.c_long
    abi = sc(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset(VERSION)
    if abi < 1:
        return
    fs = 1 << 1  # WRITE_FILE
    for bit in range(4, 13):  # REMOVE_DIR, REMOVE_FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
        fs |= 1 << bit
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: all denied
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets, signals

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    rfd = sc(444, ctypes.byref(Ruleset(fs, net, scoped)), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return
    rules = [(work, os.O_PATH | os.O_DIRECTORY, fs), ("/dev/null", os.O_PATH, fs & ((1 << 1) | (1 << 14)))]
    for path, flags, allowed in rules:
        fd = os.open(path, flags)
        rule = ctypes.byref(Beneath(allowed, fd))
        if sc(445, ctypes.c_int(rfd), ctypes.c_int(1), rule, ctypes.c_uint32(0)):  # PATH_BENEATH
            return
        os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if sc(446, ctypes.c_int(rfd), ctypes.c_uint32(0)) == 0:
        layers.append("landlock-fs")
        if net:
            layers.append("landlock-net")
        if scoped:
            layers.append("landlock-signals")
    os.close(rfd)

try:
    landlock()
except Exception:
    pass

with open(program, encoding="utf-8") as f:
    source = f.read()
code = compile(source, "<program>", "exec")

def apply_guard():
    import _socket, shutil, socket, subprocess

    def no_net(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_net()

    socket.socket = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, no_net)
        if hasattr(_socket, name):
            setattr(_socket, name, no_net)

    import posix
    root, realpath, readlink = os.path.realpath(work), os.path.realpath, os.readlink

    def inside(path, dir_fd=None, follow=True):
        if isinstance(path, int):
            return True  # an open descriptor
        p = os.fsdecode(os.fspath(path))
        if not os.path.isabs(p):
            p = os.path.join(readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else root, p)
        if follow:
            p = realpath(p)
        else:  # the entry itself (remove, rename, mkdir): resolve its folder only
            head, tail = os.path.split(os.path.normpath(p))
            p = os.path.join(realpath(head), tail)
        return p == root or p.startswith(root + os.sep)

    def check(path, dir_fd=None, follow=True):
        if not inside(path, dir_fd, follow):
            raise PermissionError(f"writing outside the sandbox folder is not allowed: {path!r}")

    def wrap(fn, *spec):  # spec: (position, name, dir_fd keyword, follow links) of each path argument
        def guarded(*args, **kwargs):
            for i, name, fd_name, follow in spec:
                path = args[i] if i < len(args) else kwargs.get(name)
                if path is not None:
                    check(path, kwargs.get(fd_name), follow)
            return fn(*args, **kwargs)
        return guarded

    real_open, real_os_open = io.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    entry, target = (0, "path", "dir_fd", False), (0, "path", "dir_fd", True)
    two = ((0, "src", "src_dir_fd", False), (1, "dst", "dst_dir_fd", False))
    guarded = {"open": (guarded_os_open,), "remove": (entry,), "unlink": (entry,), "rmdir": (entry,),
               "mkdir": (entry,), "mkfifo": (entry,), "mknod": (entry,), "rename": two, "replace": two,
               "link": ((0, "src", "src_dir_fd", True), two[1]), "symlink": ((1, "dst", "dir_fd", False),),
               "truncate": (target,), "chmod": (target,), "utime": (target,)}
    for mod in (os, posix):
        for name, spec in guarded.items():
            if hasattr(mod, name):
                setattr(mod, name, spec[0] if callable(spec[0]) else wrap(getattr(mod, name), *spec))
        for name in ("kill", "killpg", "system", "popen", "chown", "fchown", "lchown", "lchflags", "lchmod",
                     "chroot", "chdir", "fchdir", "setuid", "setgid", "setsid", "setpgid", "setpgrp", "fork",
                     "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                     "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open"):
            if hasattr(mod, name):
                setattr(mod, name, None)
    shutil.chown = None
    subprocess.Popen = None
    for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter", "_posixsubprocess"):
        sys.modules[name] = None
    builtins.exit = builtins.quit = builtins.help = None
    layers.append("guard")

if use_guard:
    apply_guard()
status.write("started " + ",".join(layers) + "\n")
status.flush()
out, err, exit_now, print_exception = sys.stdout, sys.stderr, os._exit, traceback.print_exception
try:
    exec(code, {})
except BaseException as e:
    out.flush()
    print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
    err.flush()
    exit_now(1)
status.write("passed\n")
status.flush()
out.flush(), err.flush()
exit_now(0)
'''


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for the child to end WITHOUT reaping it (its pid stays the group's id until we
    kill the group); True when it ended."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                return bool(select.select([fd], [], [], timeout)[0])
            finally:
                os.close(fd)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _remove(path: Path) -> None:
    def fix(func, p, _exc):  # a folder the program made read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if path.exists():  # a killed process was still writing: once more
        shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * DETAIL_CHARS))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text.strip()[-DETAIL_CHARS:]


def run_code(program: str, *, timeout: float = 10.0, memory_mb: int = 1024,
             guard: bool = True) -> SandboxResult:
    """Run `program` (Python source) in a limited subprocess; see the module docstring. `guard=False` leaves
    out the in-process guard (only for testing what the OS-level layers stop on their own)."""
    if timeout <= 0:
        raise LlmkitError(f"sandbox timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise LlmkitError(f"sandbox memory must be >= 64 MB, got {memory_mb}")
    root = Path(tempfile.mkdtemp(prefix="llmkit-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        status_file, output = root / "status", root / "output"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                     "MKL_NUM_THREADS"), "1")}
        argv = [sys.executable, "-I", "-B", "-c", _CHILD, str(work), str(root / "program.py"),
                str(status_file), str(memory_mb << 20), str(math.ceil(timeout) + 1), str(FILE_LIMIT),
                "1" if guard else "0"]
        with open(output, "wb") as out:
            try:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as e:
                return SandboxResult(False, "error", f"could not start the sandbox: {e}")
            try:
                ended = _wait_exit(proc, timeout)
            finally:
                _kill_group(proc.pid)  # the program's own descendants, whether it ended or not
                rc = proc.wait()
        marks = status_file.read_text(encoding="utf-8").split("\n") if status_file.exists() else []
        layers = tuple(x for x in marks[0].removeprefix("started ").split(",") if x) if marks else ()
        if rc == 0 and "passed" in marks and ended:
            return SandboxResult(True, "passed", "", layers)
        tail = _tail(output)
        if not ended:
            return SandboxResult(False, "timeout", f"killed after {timeout:g} s (wall clock)" +
                                 (f"; output: {tail}" if tail else ""), layers)
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            if -rc == signal.SIGXCPU:
                return SandboxResult(False, "timeout", "CPU time limit (SIGXCPU)", layers)
            return SandboxResult(False, "failed", f"killed by {sig}" + (f": {tail}" if tail else ""), layers)
        if not marks:
            return SandboxResult(False, "error", f"the sandbox failed to set up (exit {rc}): {tail}", layers)
        if rc == 0:
            return SandboxResult(False, "failed", "the program exited before its end" +
                                 (f": {tail}" if tail else ""), layers)
        return SandboxResult(False, "failed", tail or f"exit status {rc}", layers)
    finally:
        _remove(root)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed
    as 1 - prod_{i=n-c+1..n} (1 - k/i) (no huge binomials)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise LlmkitError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
