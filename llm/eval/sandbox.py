"""Run untrusted Python (model-written code) in a sandbox.

Model-written code is hostile input.  By default (``Limits(sandbox="bwrap")``) each program runs in
**bubblewrap** (``bwrap``, Debian/Ubuntu package ``bubblewrap``), the sandbox Flatpak is built on:

* new PID, IPC, UTS, network and mount namespaces (and a user namespace when not run as root);
  ``--die-with-parent``, ``--new-session``; the program sees only its own processes in its own
  ``/proc``, and a network namespace with nothing but a loopback of its own (no host TCP, no host
  Unix-domain sockets, abstract ones included);
* its own unprivileged uid/gid 65534 (``nobody``): as root, bwrap sets up the mounts and ``setpriv``
  drops to 65534 with no capabilities and no new privileges before Python starts;
* a read-only view of the system: ``/usr``, ``/bin``, ``/lib*``, ``/etc/ld.so.cache`` and the Python
  installation, nothing else (no ``/home``, ``/root``, host ``/tmp``, ``/run`` or ``/var``);
* its working folder (also HOME and TMPDIR) is ``/sandbox``, a tmpfs of ``disk_bytes`` in total (a
  full disk is ENOSPC there, never on the host);
* resource limits: address space, CPU seconds, file size, no core dumps, and a process count
  (``nproc``, set inside the sandbox, where it counts the sandbox's own processes);
* a wall-clock timeout, after which the whole sandbox is killed (its PID namespace goes with it; no
  process outlives the evaluation);
* a result it cannot forge or block: its stdout, stderr and result channel are pipes the evaluator
  reads with size caps and a deadline (no file the program could swap for a FIFO or ``/dev/zero``),
  and it passes only if the harness wrote an unguessable token, received on a pipe before the
  program's code ran, *after* that code (HumanEval's ``check(...)``) returned, and exited with 0.  A
  program that exits early (``sys.exit(0)``, ``os._exit(0)``) fails.  (The tests still run in the
  program's own interpreter, as in every HumanEval harness: code that sets out to dig the token out
  of the interpreter's memory could find it.)

On Windows (no rlimits, no process groups) :func:`check_can_run` refuses outright and says so.
Where bubblewrap is missing (macOS, a container without namespaces), :func:`run_program`
refuses to run model code and says how to install it, unless the caller asks for
``Limits(sandbox="unsafe")`` (``llm eval humaneval --unsafe-no-sandbox``): then each program runs as
the evaluator's own user, in its own session with the rlimits above (not ``nproc``) and a wall-clock
timeout, in a throwaway folder of the host with a minimal environment, in a network namespace when
``unshare -rn`` works, behind the Python guard of :mod:`llm.eval._guard`, which stops accidents but
not an adversary; :func:`containment` says what is and is not contained.
"""
from __future__ import annotations

import functools
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

from ._guard import GUARD

__all__ = ["GUARD", "Limits", "Outcome", "SandboxUnavailable", "check_can_run", "containment", "network_namespace_available",
           "run_program", "run_programs", "sandbox_unavailable_reason"]

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
SANDBOX_UID = 65534  # nobody
OUTPUT_CAP = 8192  # bytes of stdout / stderr kept (the last ones)
RESULT_CAP = 256  # bytes read from the result channel
SYSTEM_PATH = "/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here, and the caller did not ask for the unsafe mode."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 10_000_000  # largest file the program may write
    disk_bytes: int = 64 << 20  # everything it may write, in total (the tmpfs; bwrap only)
    nproc: int = 64  # processes (and threads) at once (bwrap only: see the module docstring)
    sandbox: str = "bwrap"  # "bwrap" | "unsafe" (no sandbox: the Python guard and rlimits only)
    network: str = "auto"  # unsafe mode: "auto" = a network namespace when unshare works; "guard" = not
    site_packages: bool = False  # False: python -S, the standard library only (see run_program)

    def __post_init__(self):
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= 24 * 3600):
            raise ValueError(f"the timeout must be a number of seconds in (0, 86400], got {self.timeout_s}")
        for name in ("memory_bytes", "file_bytes", "disk_bytes", "nproc"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 < value <= 1 << 50):
                raise ValueError(f"{name} must be a positive integer of at most 2**50, got {value!r}")
        if self.sandbox not in ("bwrap", "unsafe"):
            raise ValueError(f"sandbox must be 'bwrap' or 'unsafe', got {self.sandbox!r}")
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


# The harness: the first (and trusted) code in the sandboxed interpreter.  It takes the token from its
# pipe and closes it, sets the process limit, then runs the program's code as __main__; only if that
# returns does it write the token to the result channel.  Its names live in one function's frame.
HARNESS = r'''
def __sandbox_harness(token_fd, result_fd, body_path, nproc):
    import os
    token = os.read(token_fd, 64)
    os.close(token_fd)
    if nproc:
        import resource
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    with open(body_path, encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"})
    os.write(result_fd, b"PASSED " + token)
__sandbox_harness(__ARGS__)
'''


# ------------------------------------------------------------------------------------ availability


def _which(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH + ":/usr/sbin:/sbin")


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` (unprivileged user + network namespace) runs here; tried once."""
    unshare = _which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        probe = subprocess.run([unshare, "-rn", "--", sys.executable, "-I", "-c", "pass"],
                               env=_minimal_env(tempfile.gettempdir()), capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install "
                "bubblewrap`; Arch: `sudo pacman -S bubblewrap`), or, knowing that model-written code then runs "
                "as you with only a Python guard around it, pass --unsafe-no-sandbox (Limits(sandbox='unsafe'))")


def _no_unix_process_control() -> str | None:
    """Why this platform cannot contain a child process at all (None on Unix): the unsafe mode's
    rlimits and process groups, like bubblewrap, are Unix-only."""
    try:
        import resource  # noqa: F401  (Unix only)
    except ImportError:
        return f"{sys.platform} has no Unix rlimits (the `resource` module) or process groups"
    if not hasattr(os, "killpg"):
        return f"{sys.platform} has no Unix process groups"
    return None


def check_can_run(limits: Limits) -> None:
    """Raise :class:`SandboxUnavailable` naming the problem when model-written code cannot be run under
    ``limits`` here -- before any model is loaded or sampled from, so a HumanEval run fails at once."""
    why = _no_unix_process_control()
    if why:
        raise SandboxUnavailable(
            f"HumanEval runs model-written code, which needs a Unix sandbox: {why}, so neither bubblewrap nor "
            f"--unsafe-no-sandbox can contain it. Run it on Linux (on Windows: under WSL2, with bubblewrap "
            f"installed); every other `llm eval` task works here.")
    if limits.sandbox == "bwrap" and sandbox_unavailable_reason():
        raise SandboxUnavailable(f"refusing to run model-written code without a sandbox: "
                                 f"{sandbox_unavailable_reason()}; {INSTALL_HINT}")


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """Why bubblewrap cannot run a program here (None when it can); tried once per process."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, this is {sys.platform}"
    if _which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if os.geteuid() == 0 and _which("setpriv") is None:
        return "running as root, the sandbox drops to uid 65534 with setpriv (util-linux), which is not installed"
    outcome = _run(HARNESS_PROBE, Limits(timeout_s=30.0), check_available=False)
    if outcome.passed:
        return None
    detail = (outcome.stderr.strip().splitlines() or [outcome.reason])[-1]
    return f"bwrap is installed but cannot start a sandbox here ({detail}); user namespaces may be disabled"


HARNESS_PROBE = "pass\n"


def containment(limits: Limits) -> str:
    """What the sandbox contains and what it does not, for ``limits`` on this machine (for the CLI)."""
    if limits.sandbox == "bwrap":
        return ("sandbox: bubblewrap (own PID/IPC/UTS/network/mount namespaces, uid 65534, read-only system, "
                f"{limits.disk_bytes >> 20} MiB tmpfs work folder, {limits.nproc} processes, "
                f"{limits.memory_bytes >> 20} MiB address space, {limits.timeout_s:g} s)")
    net = "its own network namespace" if limits.network == "auto" and network_namespace_available() else \
        "the host's network behind a Python guard only"
    return ("UNSAFE, no sandbox: model-written code runs as this user, in a throwaway folder with a minimal "
            f"environment, rlimits ({limits.memory_bytes >> 20} MiB, {limits.timeout_s:g} s) and {net}. "
            "Contained: time, memory, the size of each file, early exits (no token, no pass), stray processes of "
            "its session. NOT contained: anything it does as you with posix/_io/ctypes/importlib.reload (reading, "
            "writing and deleting your files, running commands, killing your processes), processes that leave "
            "its session, filling the disk with many files, reading other processes' /proc")


# ------------------------------------------------------------------------------------------ running


def _minimal_env(home: str) -> dict[str, str]:
    # -I makes Python ignore PYTHON* variables; -B (not PYTHONDONTWRITEBYTECODE) is what stops .pyc
    # files then, but the variable is kept for anything the program might start.
    return {"PATH": SYSTEM_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _rlimits(limits: Limits) -> list:
    """(resource, (soft, hard)) to set in the child, never above what this process may grant."""
    import resource  # Unix only: imported here so that importing this module works everywhere

    cpu = math.ceil(limits.timeout_s) + 1  # CPU time cannot exceed wall time; the wall clock usually fires first
    wanted = [
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU, hard a second later: SIGKILL
        (resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    out = []
    for which, (soft, hard) in wanted:
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:  # an unprivileged process can only lower a hard limit
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append((which, (soft, hard)))
    return out


def _bwrap_argv(limits: Limits, run_dir: str) -> list[str]:
    """bwrap ... -- [setpriv ...] python -I -B -S /run/sandbox/harness.py"""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    argv = [_which("bwrap"), "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try"]
    as_root = os.geteuid() == 0
    if not as_root:  # unprivileged: a user namespace in which the program is uid 65534
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    if os.path.exists("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in dict.fromkeys((prefix, os.path.dirname(os.path.dirname(python)))):
        if not path.startswith("/usr/") and os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    # (bwrap makes folders it creates 0700 when privileged: /run and /sandbox get their modes spelled out)
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--size", str(limits.disk_bytes), "--tmpfs",
             "/sandbox", "--perms", "0755", "--dir", "/run", "--ro-bind", run_dir, "/run/sandbox", "--chdir", "/sandbox",
             "--clearenv"]
    for key, value in _minimal_env("/sandbox").items():
        argv += ["--setenv", key, value]
    argv.append("--")
    if as_root:  # bwrap keeps root's capabilities in privileged mode: drop to 65534, none left
        argv += [_which("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return argv + [python, "-I", "-B", *([] if limits.site_packages else ["-S"]), "/run/sandbox/harness.py"]


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) in the sandbox (see the module docstring).  Passed means: its
    code ran to the end (the harness's token arrived after it) and it exited with status 0.

    Raises :class:`SandboxUnavailable` when ``limits.sandbox == "bwrap"`` and bubblewrap cannot run here.
    """
    return _run(program, limits, check_available=True)


def _run(program: str, limits: Limits, *, check_available: bool) -> Outcome:
    bwrap = limits.sandbox == "bwrap"
    if check_available:
        check_can_run(limits)
    settings = _rlimits(limits)
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="llm-sandbox-", ignore_cleanup_errors=True) as tmp:
        run_dir = os.path.realpath(tmp)
        tok_r, tok_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.write(tok_w, token)
        os.close(tok_w)
        body = program if bwrap else GUARD.replace("__SANDBOX_ROOT__", repr(run_dir)) + "\n" + program
        body_path = "/run/sandbox/body.py" if bwrap else os.path.join(run_dir, "body.py")
        with open(os.path.join(run_dir, "body.py"), "w", encoding="utf-8") as f:
            f.write(body)
        args = f"{tok_r}, {res_w}, {body_path!r}, {limits.nproc if bwrap else 0}"
        with open(os.path.join(run_dir, "harness.py"), "w", encoding="utf-8") as f:
            f.write(HARNESS.replace("__ARGS__", args))
        if bwrap:  # readable by uid 65534 (mkdtemp made the folder 0700)
            os.chmod(run_dir, 0o755)
            for name in ("body.py", "harness.py"):
                os.chmod(os.path.join(run_dir, name), 0o644)
            cmd, cwd, env = _bwrap_argv(limits, run_dir), run_dir, {"PATH": SYSTEM_PATH}
        else:
            cmd = [sys.executable, "-I", "-B", *([] if limits.site_packages else ["-S"]), os.path.join(run_dir, "harness.py")]
            if limits.network == "auto" and network_namespace_available():
                cmd = [_which("unshare"), "-rn", "--", *cmd]
            cwd, env = run_dir, _minimal_env(run_dir)

        # Runs in the child between fork and exec.  preexec_fn is documented as unsafe with threads
        # (run_programs has several) because the child could block on a lock another thread held at
        # fork time; this one takes no lock of its own: it only calls setrlimit with values computed above.
        def apply_limits():
            import resource

            for which, values in settings:
                resource.setrlimit(which, values)

        start = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                    pass_fds=(tok_r, res_w), start_new_session=True, preexec_fn=apply_limits)
        finally:
            for fd in (tok_r, res_w, out_w, err_w):
                os.close(fd)
        try:
            got, timed_out = _collect(proc, {"out": out_r, "err": err_r, "res": res_r}, start + limits.timeout_s)
        finally:
            _kill_group(proc.pid)  # after a timeout: everything; after an exit: stray children
            proc.wait()
            for fd in (out_r, err_r, res_r):
                os.close(fd)
        seconds = time.perf_counter() - start
    stdout, stderr = (got[k].decode("utf-8", errors="replace") for k in ("out", "err"))
    if timed_out:
        return Outcome(TIMED_OUT, f"timed out after {limits.timeout_s:g} s", None, seconds, stdout, stderr)
    rc = proc.returncode
    if rc == 0 and got["res"] == b"PASSED " + token:
        return Outcome(PASSED, "", 0, seconds, stdout, stderr)
    if rc == 0:
        why = ("exited before its code finished (status 0, but no completion token from the harness)" if not got["res"]
               else "wrote a wrong completion token")
        return Outcome(FAILED, why, rc, seconds, stdout, stderr)
    return Outcome(FAILED, _failure_reason(rc, stderr), rc, seconds, stdout, stderr)


def _collect(proc: subprocess.Popen, fds: dict[str, int], deadline: float) -> tuple[dict[str, bytes], bool]:
    """Read the pipes until they close, the process has exited and its stragglers are gone, or the
    deadline passes (then True).  stdout/stderr keep their last OUTPUT_CAP bytes, the result channel
    its first RESULT_CAP: the program can make the evaluator read neither without bound nor for ever."""
    got = {k: b"" for k in fds}
    sel = selectors.DefaultSelector()
    for key, fd in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, key)
    exited_at = None
    try:
        while sel.get_map():
            now = time.perf_counter()
            if now >= deadline:
                return got, True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                _kill_group(proc.pid)  # its own session's stragglers (unsafe mode; bwrap kills its namespace)
            if exited_at is not None and now - exited_at > 1.0:
                break  # exited, but something outside its session holds a pipe open: stop reading
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                elif key.data == "res":
                    got["res"] = (got["res"] + data)[:RESULT_CAP]
                else:
                    got[key.data] = (got[key.data] + data)[-OUTPUT_CAP:]
        # pipes closed: wait for the exit itself, within the deadline
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            return got, True
        return got, False
    finally:
        sel.close()


def _describe_signal(sig: int) -> str:
    why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)",
           signal.SIGKILL: " (killed: CPU or memory limit)", signal.SIGSEGV: " (segmentation fault)"}
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"killed by {name}{why.get(sig, '')}"


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        return _describe_signal(-returncode)
    if returncode > 128 and returncode - 128 in signal.valid_signals():  # bwrap reports a signal as 128 + n
        return _describe_signal(returncode - 128)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {returncode}"


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
    check_can_run(limits)  # say it once, before any thread starts
    outcomes: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(programs), desc=desc, unit="prog", disable=not progress) as bar:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            outcomes[futures[future]] = future.result()
            bar.update(1)
    return outcomes
