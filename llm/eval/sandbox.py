"""Run untrusted Python (model-written code) in a separate, limited process.

What actually protects the machine, in order of strength:

1. **A separate process** (``python -I -B -S file``: isolated mode, no PYTHON* variables, no .pyc
   files, no site-packages unless asked for, so also no ``exit()`` builtin: ``sys.exit`` works)
   in its **own session**, so on a timeout ``os.killpg`` kills it and everything it
   started; stray children are killed the same way after a normal exit.
2. **Resource limits** set in the child before ``exec`` (``preexec_fn``): address space
   (RLIMIT_AS, 1 GiB by default: a huge allocation raises MemoryError), CPU seconds (RLIMIT_CPU,
   the timeout rounded up: SIGXCPU, then SIGKILL), file size (RLIMIT_FSIZE, 10 MB: also caps the
   captured output, which goes to files), no core dumps.  RLIMIT_NPROC is off by default: Linux
   counts it over *all* processes of the user on the machine (IDEs, other jobs, other tests), so
   any value small enough to stop a fork bomb makes unrelated runs fail at random; pass
   ``nproc=`` where the sandbox runs under a dedicated user.  Forking is refused by the guard
   below, and the whole process group is killed at the end either way.
3. A **wall-clock timeout** (sleeping programs use no CPU).
4. A **fresh temporary folder** as the working directory and HOME, deleted afterwards, and a
   **minimal environment** (PATH, HOME, LANG only): no secrets or tokens from the parent's env.
5. **No network**, best effort: when ``unshare -rn`` works here (a user + network namespace
   without interfaces; tested once per process and cached), the program runs inside one.

And a Python-level **guard**, prepended to every program, in the spirit of human-eval's
``reliability_guard``: writing files outside the temporary folder, deleting/renaming/chmod-ing
files, ``os.fork``/``subprocess``/``os.system``, killing processes and opening network
connections raise PermissionError.  It is best effort only: code that wants to can get around it
(``posix.open``, ``ctypes``, ...); it stops accidents, not an adversary.  Do not run code you would
not run on this machine without a container or VM around it.
"""
from __future__ import annotations

import functools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

__all__ = ["GUARD", "Limits", "Outcome", "network_namespace_available", "run_program", "run_programs"]

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 10_000_000  # largest file the program may write (its stdout/stderr included)
    nproc: int | None = None  # RLIMIT_NPROC; see the module docstring for why it is off by default
    network: str = "auto"  # "auto": a network namespace when unshare works; "guard": the Python guard only
    site_packages: bool = False  # False: python -S, the standard library only (see run_program)

    def __post_init__(self):
        if not (self.timeout_s > 0 and self.memory_bytes > 0 and self.file_bytes > 0):
            raise ValueError(f"timeout, memory and file limits must be positive: {self}")
        if self.network not in ("auto", "guard"):
            raise ValueError(f"network must be 'auto' or 'guard', got {self.network!r}")


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timed out"
    reason: str  # "" when passed, else e.g. "AssertionError", "MemoryError", "killed by SIGXCPU ..."
    returncode: int | None
    seconds: float
    stdout: str  # the last few KB
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


# The guard runs first in the sandboxed program.  It must not leave names behind (the program's own
# globals), hence one function that deletes itself.
GUARD = r'''
def __sandbox_guard(root):
    import builtins, io, os, shutil, socket, subprocess

    root = os.path.realpath(root)

    def inside(path):
        try:
            p = os.path.realpath(os.fsdecode(path))  # relative paths resolve against the real cwd
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

    def refuse(what):
        def blocked(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return blocked

    real_open = builtins.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the sandbox folder is not allowed: {file!r}")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open  # pathlib and most libraries open files through io.open

    real_os_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & writing and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(f"sandbox: writing outside the sandbox folder is not allowed: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)
    os.open = guarded_os_open

    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "link", "symlink",
                 "kill", "killpg", "system", "popen", "fork", "forkpty",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                 "setuid", "setgid", "setsid"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    subprocess.Popen = refuse("subprocess")  # run/call/check_output all go through Popen

    no_net = refuse("network access")
    for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, name, no_net)
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, name, no_net)


__sandbox_guard(__SANDBOX_ROOT__)
del __sandbox_guard
'''


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` (unprivileged user + network namespace) runs here; tried once."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        probe = subprocess.run([unshare, "-rn", "--", sys.executable, "-I", "-c", "pass"],
                               env=_minimal_env(tempfile.gettempdir()), capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _minimal_env(home: str) -> dict[str, str]:
    # -I makes Python ignore PYTHON* variables; -B (not PYTHONDONTWRITEBYTECODE) is what stops .pyc
    # files then, but the variable is kept for anything the program might start.
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _rlimits(limits: Limits) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) to set in the child, never above what this process may grant."""
    cpu = math.ceil(limits.timeout_s) + 1  # CPU time cannot exceed wall time; the wall clock usually fires first
    wanted = [
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU, hard a second later: SIGKILL
        (resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if limits.nproc is not None:
        wanted.append((resource.RLIMIT_NPROC, (limits.nproc, limits.nproc)))
    out = []
    for which, (soft, hard) in wanted:
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:  # an unprivileged process can only lower a hard limit
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append((which, (soft, hard)))
    return out


def _describe_signal(sig: int) -> str:
    why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)",
           signal.SIGKILL: " (killed: CPU or memory limit)", signal.SIGSEGV: " (segmentation fault)"}
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"killed by {name}{why.get(sig, '')}"


def _tail(path: str, n_bytes: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n_bytes))
        return f.read().decode("utf-8", errors="replace")


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        return _describe_signal(-returncode)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {returncode}"


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) in the sandbox; passed means it exited with status 0."""
    settings = _rlimits(limits)

    # Runs in the child between fork and exec.  preexec_fn is documented as unsafe with threads
    # (run_programs has several) because the child could block on a lock another thread held at
    # fork time; this one takes no lock of its own: it only calls setrlimit with values computed above.
    def apply_limits():
        for which, values in settings:
            resource.setrlimit(which, values)

    with tempfile.TemporaryDirectory(prefix="llm-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = os.path.realpath(tmp)
        path = os.path.join(root, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(GUARD.replace("__SANDBOX_ROOT__", repr(root)) + "\n" + program)
        # -S (no site): the standard library only, which is all HumanEval needs, and 4-5x faster
        # start-up here (the environment's site hooks, e.g. editable installs, cost ~0.1 s a run).
        cmd = [sys.executable, "-I", "-B", *([] if limits.site_packages else ["-S"]), path]
        if limits.network == "auto" and network_namespace_available():
            cmd = [shutil.which("unshare", path="/usr/bin:/bin"), "-rn", "--", *cmd]
        out_path, err_path = os.path.join(root, ".stdout"), os.path.join(root, ".stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=root, env=_minimal_env(root), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, preexec_fn=apply_limits)
            try:
                timed_out = not _wait(proc, limits.timeout_s)
            finally:
                # After a timeout: everything; after an exit: stray children.  The pidfd wait leaves
                # the exited leader unreaped, so its pid (= the group id) cannot have been reused.
                _kill_group(proc.pid)
                proc.wait()
        seconds = time.perf_counter() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
    if timed_out:
        return Outcome(TIMED_OUT, f"timed out after {limits.timeout_s:g} s", None, seconds, stdout, stderr)
    if proc.returncode == 0:
        return Outcome(PASSED, "", 0, seconds, stdout, stderr)
    return Outcome(FAILED, _failure_reason(proc.returncode, stderr), proc.returncode, seconds, stdout, stderr)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``proc`` to exit, at most ``timeout`` seconds; False if it is still running.

    Popen.wait(timeout) polls with sleeps of up to 50 ms, which would dominate short programs; a
    pidfd (Linux 5.3+) becomes readable the moment the process exits.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or an old kernel
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()  # (select.select cannot take descriptors past 1023)
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))
    finally:
        os.close(fd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def run_programs(programs: list[str], limits: Limits = Limits(), *, workers: int = 4,
                 progress: bool = True, desc: str = "sandbox") -> list[Outcome]:
    """:func:`run_program` for each program, ``workers`` at a time; outcomes in the programs' order.

    Threads are enough: each one only waits on its subprocess.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    outcomes: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(programs), desc=desc, unit="prog", disable=not progress) as bar:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            outcomes[futures[future]] = future.result()
            bar.update(1)
    return outcomes
