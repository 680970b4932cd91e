"""llm.eval.sandbox: what model-written code can and cannot do to the machine that evaluates it.

Each attack from the audit of issue 11 (every one of them got out of the sandbox before bubblewrap)
runs as its own program against a canary file, marker file, socket or process that the test owns;
the test asserts that it stayed contained and that the evaluator is still there to run the next
program.  They need bubblewrap: without it they skip with the reason, except where
LLM_REQUIRE_SANDBOX=1 (CI sets it, after installing bubblewrap), where that is a failure.  The
unsafe mode (no bubblewrap, the user's explicit choice) is tested at the end.
"""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.eval import sandbox
from llm.eval.sandbox import Limits, SandboxUnavailable, run_program

FAST = Limits(timeout_s=5.0)
REASON = sandbox.sandbox_unavailable_reason() if sys.platform.startswith("linux") else "not Linux"
if REASON and os.environ.get("LLM_REQUIRE_SANDBOX") == "1":
    raise RuntimeError(f"LLM_REQUIRE_SANDBOX=1 but the sandbox cannot run here: {REASON}")
needs_bwrap = pytest.mark.skipif(REASON is not None, reason=f"bubblewrap sandbox unavailable: {REASON}")


def _still_works():
    """The evaluator survived: the next program runs and passes."""
    outcome = run_program("import math\nprint(math.factorial(5))", FAST)
    assert outcome.passed and outcome.stdout == "120\n", outcome


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("precious")
    return path


def _contained(program: str, *, limits: Limits = FAST):
    outcome = run_program(program, limits)
    _still_works()
    return outcome


# ------------------------------------------------------------------------------------ files

@needs_bwrap
@pytest.mark.parametrize("how", ["posix", "fileio", "io_open", "reload_os", "reload_shutil"])
def test_writing_and_deleting_host_files_is_contained(canary, how, tmp_path):
    target, marker = str(canary), str(tmp_path / "created.txt")
    programs = {
        "posix": f"import posix\nfd = posix.open({target!r}, posix.O_WRONLY | posix.O_TRUNC)\nposix.write(fd, b'pwned')\n"
                 f"posix.close(posix.open({marker!r}, posix.O_CREAT | posix.O_WRONLY))\nposix.unlink({target!r})",
        "fileio": f"import _io\n_io.FileIO({target!r}, 'w').write(b'pwned')\n_io.FileIO({marker!r}, 'w')",
        "io_open": f"import _io\n_io.open({target!r}, 'w').write('pwned')",
        "reload_os": f"import importlib, os\nimportlib.reload(os)\nos.remove({target!r})",
        "reload_shutil": f"import importlib, shutil\nimportlib.reload(shutil)\nshutil.rmtree({str(tmp_path)!r})",
    }
    outcome = _contained(programs[how])
    assert outcome.status == "failed", outcome
    assert canary.read_text() == "precious" and not Path(marker).exists()


@needs_bwrap
def test_the_system_is_read_only_and_the_hosts_tmp_invisible(tmp_path):
    (tmp_path / "visible.txt").write_text("host file")
    program = (
        "import os\n"
        "for path in ('/usr/pwned', '/etc/pwned', '/run/sandbox/pwned'):\n"
        "    try:\n        open(path, 'w')\n    except OSError as e:\n        print('refused', path, e.errno)\n"
        f"assert not os.path.exists({str(tmp_path / 'visible.txt')!r})\n"
        "assert not os.path.exists('/tmp') and not os.path.exists('/home') and not os.path.exists('/var')\n"
        "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n"  # its own folder is writable
    )
    outcome = _contained(program)
    assert outcome.passed, outcome
    assert outcome.stdout.count("refused") == 3


@needs_bwrap
def test_filling_the_disk_stops_at_the_sandboxs_own_limit(tmp_path):
    limits = Limits(timeout_s=10.0, disk_bytes=32 << 20)
    program = ("n = 0\ntry:\n    for i in range(40):\n        with open(f'f{i}', 'wb') as f:\n"
               "            f.write(b'x' * 9_000_000)\n        n += 1\nexcept OSError as e:\n"
               "    print('stopped after', n, 'files:', e.strerror)\n")
    outcome = _contained(program, limits=limits)
    assert outcome.passed and "No space left on device" in outcome.stdout, outcome
    assert int(outcome.stdout.split()[2]) * 9_000_000 <= 32 << 20


# ------------------------------------------------------------------------------ commands, processes

@needs_bwrap
@pytest.mark.parametrize("how", ["ctypes", "posix_spawn", "reload_subprocess"])
def test_running_commands_cannot_touch_the_host(how, tmp_path):
    marker = str(tmp_path / "ran.txt")
    shell = f"echo pwned > {marker}"
    programs = {
        "ctypes": f"import ctypes\nprint('rc', ctypes.CDLL(None).system({shell!r}.encode()))",
        "posix_spawn": f"import posix\npid = posix.posix_spawn('/bin/sh', ['sh', '-c', {shell!r}], {{}})\n"
                       "print('status', posix.waitpid(pid, 0))",
        "reload_subprocess": f"import importlib, subprocess\nimportlib.reload(subprocess)\n"
                             f"print(subprocess.run(['sh', '-c', {shell!r}]).returncode)",
    }
    _contained(programs[how])
    assert not Path(marker).exists()


@needs_bwrap
def test_killing_the_evaluator_or_a_bystander_is_contained():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        program = (f"import posix\nfor pid in (posix.getppid(), 1, {bystander.pid}, {os.getpid()}):\n"
                   "    try:\n        posix.kill(pid, 9)\n    except OSError as e:\n        print('refused', pid, e.errno)\n")
        _contained(program)
        assert bystander.poll() is None, "the program killed a process of the host"
    finally:
        bystander.kill()
        bystander.wait()


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@needs_bwrap
def test_no_process_outlives_the_evaluation():
    seconds = f"{3000 + secrets.randbelow(999)}.{secrets.randbelow(10**6)}"  # a unique argv to look for
    program = ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
               f"        posix.execv('/bin/sleep', ['sleep', {seconds!r}])\n    posix._exit(0)\ntime.sleep(0.5)\n")
    outcome = _contained(program)
    assert outcome.passed, outcome
    time.sleep(0.3)
    assert _host_processes_with(seconds) == []


@needs_bwrap
def test_a_fork_bomb_hits_the_process_limit():
    program = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
               "            time.sleep(3)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
               "    print('forks', n, e.strerror)\n")
    outcome = _contained(program, limits=Limits(timeout_s=10.0, nproc=32))
    assert outcome.passed and "forks" in outcome.stdout, outcome
    assert int(outcome.stdout.split()[1]) < 32


@needs_bwrap
def test_it_runs_as_uid_65534_without_capabilities():
    program = ("import os\nassert os.getuid() == os.geteuid() == 65534 and os.getgid() == 65534, os.getuid()\n"
               "caps = {l.split(':')[0]: int(l.split()[1], 16) for l in open('/proc/self/status') if l.startswith('Cap')}\n"
               "assert caps['CapEff'] == caps['CapPrm'] == 0, caps\nassert os.getppid() in (0, 1)\n")
    outcome = _contained(program)
    assert outcome.passed, outcome


# ------------------------------------------------------------------------------------- network

@needs_bwrap
def test_host_unix_sockets_and_loopback_tcp_are_out_of_reach(tmp_path):
    path_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path_sock.bind(str(tmp_path / "host.sock"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"llm-test-{secrets.token_hex(4)}"
    abstract.bind("\0" + name)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    for s in (path_sock, abstract, tcp):
        s.listen(1)
        s.setblocking(False)
    try:
        program = (
            "import _socket\n"
            f"for family, addr in ((_socket.AF_UNIX, {str(tmp_path / 'host.sock')!r}), "
            f"(_socket.AF_UNIX, '\\0{name}'), (_socket.AF_INET, ('127.0.0.1', {port}))):\n"
            "    s = _socket.socket(family, _socket.SOCK_STREAM)\n"
            "    try:\n        s.connect(addr)\n        print('CONNECTED', addr)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
        )
        outcome = _contained(program)
        assert outcome.passed and "CONNECTED" not in outcome.stdout and outcome.stdout.count("refused") == 3, outcome
        for s in (path_sock, abstract, tcp):
            with pytest.raises(BlockingIOError):
                s.accept()  # nobody ever connected
    finally:
        for s in (path_sock, abstract, tcp):
            s.close()


@needs_bwrap
def test_the_evaluators_environment_is_unreadable(monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("LLM_SANDBOX_SECRET", secret)
    program = ("import os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self', "
               f"'{os.getpid()}']:\n    try:\n        print(open(f'/proc/{{pid}}/environ', 'rb').read())\n"
               "    except OSError as e:\n        print('refused', pid, e.errno)\nprint(sorted(os.environ))\n")
    outcome = _contained(program)
    assert secret not in outcome.stdout and "LLM_SANDBOX_SECRET" not in outcome.stdout, outcome.stdout


# ------------------------------------------------------------------------- the evaluator's channels

@needs_bwrap
def test_a_fifo_or_dev_zero_in_place_of_the_output_cannot_hang_the_evaluator():
    program = "import os\nos.mkfifo('.stdout')\nos.mkfifo('.stderr')\nos.symlink('/dev/zero', '.result')\n"
    start = time.perf_counter()
    outcome = _contained(program)
    assert outcome.passed and time.perf_counter() - start < FAST.timeout_s, outcome


@needs_bwrap
def test_unbounded_output_is_read_within_a_cap_and_a_deadline():
    program = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    start = time.perf_counter()
    outcome = _contained(program, limits=Limits(timeout_s=2.0))
    assert outcome.status == "timed out" and len(outcome.stdout) <= sandbox.OUTPUT_CAP
    assert time.perf_counter() - start < 10


@needs_bwrap
@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "os.kill(os.getpid(), 9)"])
def test_exiting_before_the_tests_is_not_a_pass(exit_call):
    outcome = _contained(f"import os, sys\n{exit_call}\nraise AssertionError('the tests would fail')\n")
    assert outcome.status == "failed", outcome


@needs_bwrap
def test_writing_on_the_result_channel_cannot_forge_a_pass():
    program = ("import os, sys\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'PASSED ' + b'0' * 32)\n"
               "    except OSError:\n        pass\nos._exit(0)\n")
    outcome = _contained(program)
    assert outcome.status == "failed" and "token" in outcome.reason, outcome


# ------------------------------------------------------------------------------- the old limits

@needs_bwrap
def test_time_and_memory_limits_still_hold():
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert outcome.status == "timed out" and "1 s" in outcome.reason
    outcome = run_program("x = bytearray(10**11)\n", Limits(timeout_s=10.0, memory_bytes=256 << 20))
    assert outcome.status == "failed" and "MemoryError" in outcome.reason
    outcome = run_program("open('big', 'wb').write(b'x' * 2_000_000)", Limits(timeout_s=5.0, file_bytes=1_000_000))
    assert outcome.status == "failed" and ("File too large" in outcome.reason or "SIGXFSZ" in outcome.reason)


# -------------------------------------------------------------------- no bubblewrap: refuse, or unsafe

def test_without_bubblewrap_model_code_is_refused_unless_the_user_says_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_unavailable_reason", lambda: "bwrap (bubblewrap) is not installed")
    for call in (lambda: run_program("print(1)"), lambda: sandbox.run_programs(["print(1)"], progress=False)):
        with pytest.raises(SandboxUnavailable, match="bubblewrap.*apt-get install bubblewrap.*--unsafe-no-sandbox"):
            call()
    outcome = run_program("print(1)", Limits(timeout_s=5.0, sandbox="unsafe"))
    assert outcome.passed and outcome.stdout == "1\n"


def test_the_unsafe_mode_says_what_it_does_not_contain():
    text = sandbox.containment(Limits(sandbox="unsafe"))
    assert text.startswith("UNSAFE") and "NOT contained" in text and "as this user" in text
    assert "bubblewrap" in sandbox.containment(Limits())


UNSAFE = Limits(timeout_s=5.0, sandbox="unsafe")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the unsafe mode's tests use Linux /proc")
def test_the_unsafe_mode_keeps_its_guard_timeout_and_token(tmp_path, canary):
    outcome = run_program(f"open({str(tmp_path / 'evil.txt')!r}, 'w')", UNSAFE)
    assert "PermissionError" in outcome.reason and not (tmp_path / "evil.txt").exists()
    outcome = run_program(f"import os\nos.remove({str(canary)!r})", UNSAFE)
    assert "PermissionError" in outcome.reason and canary.read_text() == "precious"
    assert "subprocess is not allowed" in run_program("import subprocess\nsubprocess.run(['true'])", UNSAFE).reason
    assert run_program("import sys\nsys.exit(0)", UNSAFE).status == "failed"  # no token, no pass
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.0, sandbox="unsafe")).status == "timed out"
    program = "import posix, sys, time\nif posix.fork():\n    print('parent', flush=True)\ntime.sleep(60)\n"
    start = time.perf_counter()
    assert run_program(program, Limits(timeout_s=1.0, sandbox="unsafe")).status == "timed out"
    assert time.perf_counter() - start < 5


def test_limits_reject_impossible_values():
    for kwargs in ({"timeout_s": float("inf")}, {"timeout_s": 1e300}, {"timeout_s": 0}, {"memory_bytes": 1 << 60},
                   {"nproc": 0}, {"disk_bytes": -1}, {"sandbox": "docker"}):
        with pytest.raises(ValueError):
            Limits(**kwargs)


def test_a_signal_is_reported_by_name():
    assert sandbox._failure_reason(-signal.SIGXCPU, "") == "killed by SIGXCPU (CPU time limit)"
    assert sandbox._failure_reason(128 + signal.SIGKILL, "") == "killed by SIGKILL (killed: CPU or memory limit)"
