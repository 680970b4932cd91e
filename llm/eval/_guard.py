"""The Python-level guard of the *unsafe* sandbox mode (``Limits(sandbox="unsafe")``), used only where
bubblewrap cannot run and the user said so explicitly.

It is prepended to the program, in the spirit of human-eval's ``reliability_guard``: writing files
outside the program's folder, deleting/renaming/chmod-ing files, ``os.fork``/``subprocess``/
``os.system``, killing processes and opening network connections raise PermissionError.  It stops
accidents, not an adversary: ``posix.open``, ``_io.FileIO``, ``ctypes``, ``importlib.reload(os)`` and
more get around it (tests/test_sandbox.py lists what escaped it in the audit of issue 11).  It must
not leave names behind in the program's globals, hence one function that deletes itself.
"""

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
