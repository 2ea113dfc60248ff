"""Running model-written Python, which can do anything, without letting it harm the machine that grades it.

    sandbox.run_many([sandbox.Job("def f(x):\n    return 2 * x", tests="assert f(2) == 4")])  # [Result(passed=True..)]

Each program runs in its own process and session (so its whole process group can be killed), in a fresh
temporary directory that is deleted afterwards, as user `nobody` when the grader runs as root (and nobody can
run this Python: not when it lives under /root), with:
  - a stripped environment (no inherited tokens or keys) and stdin from a file (the test's input) or empty;
  - limits set by the child on itself before the program's first line: CPU seconds, address space, size
    of any file it writes (stdout and stderr go to files, so printing gigabytes ends at the cap), processes;
  - a wall-clock timeout, after which the whole process group is killed; leftovers are killed in any case;
  - a guard that disables killing, forking and exec, and writing, deleting or renaming outside its directory.
The OS limits are the enforcement; the guard is a seatbelt against accidents, since Python code can undo it
(via ctypes, say). Run as root without the switch to nobody, the process limit does not bind (Linux exempts
root) and only the guard stops forks. For programs written to attack the grader, run the evaluation in a
container or VM.
Programs run in parallel, one per core by default.
"""

import functools
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NOBODY = 65534  # uid/gid the programs run as when the grader is root


@dataclass
class Job:
    source: str  # a Python program
    stdin: str = ""  # its standard input
    tests: str = ""  # code run after it in the same namespace; then the job passes only if they run to the end


@dataclass
class Result:
    passed: bool  # ran to the end (the tests, if any, to their end) and exited with status 0 in time
    status: str  # "passed", "failed" (an error, killed by a limit, or exited before the tests ended), "timeout"
    returncode: int
    stdout: str  # at most max_output_bytes
    stderr: str  # the last 2000 characters
    seconds: float


# Runs first in the child: limits, then the guard, then the program, compiled from program.py.
RUNNER = """
import builtins, io, os, posix, resource, shutil, subprocess, sys
for limit, value in {limits!r}.items():
    resource.setrlimit(getattr(resource, limit), (value, value))
def refused(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")
home = os.path.realpath(os.getcwd())
def inside(path):
    if isinstance(path, int):  # an open file descriptor
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == home or path.startswith(home + os.sep)
def only_inside(function, paths):
    def guarded(*args, **kwargs):
        if any("dir_fd" in key for key in kwargs) or not all(map(inside, args[:paths])):
            raise PermissionError("changing files outside the sandbox directory")
        return function(*args, **kwargs)
    return guarded
for module in (os, posix):
    for name in {blocked!r}:
        if hasattr(module, name):
            setattr(module, name, refused)
    for name, paths in {inside_only!r}.items():
        if hasattr(module, name):
            setattr(module, name, only_inside(getattr(module, name), paths))
shutil.rmtree = shutil.move = shutil.chown = subprocess.Popen = resource.setrlimit = resource.prlimit = refused
open_file, open_fd = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and set(mode) & set("wax+") and not inside(file):
        raise PermissionError("writing outside the sandbox directory")
    return open_file(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and (kwargs or not inside(path)):
        raise PermissionError("writing outside the sandbox directory")
    return open_fd(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = posix.open = guarded_os_open
del builtins, io, posix, resource, shutil, subprocess, limit, value, module, name, paths
namespace = {{"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}}
finished = False  # marked in a file whose name the program is not told, so it cannot be faked by accident
try:
    exec(compile(open_file("program.py").read(), "program.py", "exec"), namespace)
    if {has_tests}:  # sys.exit(0) inside the program must not skip them
        exec(compile(open_file("tests.py").read(), "tests.py", "exec"), namespace)
    finished = True
except SystemExit as e:
    finished = not {has_tests} and e.code in (None, 0)
    raise
finally:
    if finished:
        open_file({marker!r}, "w").close()
"""
BLOCKED = (
    "kill killpg fork forkpty vfork setsid setpgid setuid setgid setreuid setregid system popen "
    "chown lchown fchown link symlink "
    "execv execve execvp execvpe execl execle execlp execlpe spawnv spawnve spawnvp spawnvpe posix_spawn "
    "posix_spawnp chroot"
).split()
INSIDE_ONLY = {"remove": 1, "unlink": 1, "rmdir": 1, "removedirs": 1, "rename": 2, "renames": 2, "replace": 2,
               "truncate": 1, "chmod": 1}  # fmt: skip


@functools.cache
def others_can_run_python():
    """Whether a user other than the owner can run this interpreter and read its standard library."""
    for path in (os.path.realpath(sys.executable), os.path.realpath(os.path.dirname(os.__file__))):
        while path != "/":
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
            path = os.path.dirname(path)
    return True


def processes_of(uid):
    """Number of processes that user `uid` runs now (the process limit counts them all)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return count


def run(job, timeout=10.0, memory_mb=2048, max_processes=32, max_output_bytes=16 << 20):
    """Run one program; never raises for anything the program does."""
    as_nobody = os.geteuid() == 0 and others_can_run_python()
    uid = NOBODY if as_nobody else os.geteuid()
    limits = {
        "RLIMIT_CPU": int(timeout) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": max_output_bytes,
        "RLIMIT_NPROC": processes_of(uid) + max_processes,
        "RLIMIT_CORE": 0,
    }
    home = tempfile.mkdtemp(prefix="sandbox-")
    try:
        with open(os.path.join(home, "program.py"), "w") as f:
            f.write(job.source)
        with open(os.path.join(home, "tests.py"), "w") as f:
            f.write(job.tests)
        with open(os.path.join(home, "stdin.txt"), "w") as f:
            f.write(job.stdin)
        if as_nobody:
            for name in ("", "program.py", "tests.py", "stdin.txt"):
                os.chown(os.path.join(home, name), NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        marker = f"finished-{secrets.token_hex(8)}"
        runner = RUNNER.format(
            limits=limits, blocked=BLOCKED, inside_only=INSIDE_ONLY, has_tests=bool(job.tests), marker=marker
        )
        start = time.perf_counter()
        with (
            open(os.path.join(home, "stdin.txt")) as stdin,
            open(os.path.join(home, "stdout.txt"), "w") as stdout,
            open(os.path.join(home, "stderr.txt"), "w") as stderr,
        ):
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", runner],
                    cwd=home,
                    env=env,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    close_fds=True,
                    **({"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}),
                )
            except OSError as e:  # could not start it (out of processes or files): a failed sample
                return Result(False, "failed", -1, "", f"sandbox: cannot start the program: {e}", 0.0)
            try:
                returncode, status = process.wait(timeout=timeout), None
            except subprocess.TimeoutExpired:
                returncode, status = -9, "timeout"
            try:  # the whole group, on timeout and after a normal exit alike (children left running)
                os.killpg(process.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        seconds = time.perf_counter() - start

        def read(name, size):
            with open(os.path.join(home, name), errors="replace") as f:
                return f.read(size)

        finished = os.path.exists(os.path.join(home, marker))
        status = status or ("passed" if returncode == 0 and finished else "failed")
        stderr_text = read("stderr.txt", max_output_bytes)[-2000:]
        return Result(
            status == "passed", status, returncode, read("stdout.txt", max_output_bytes), stderr_text, seconds
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_many(jobs, workers=None, **limits):
    """Run jobs in parallel (default one per core); results in the order of the jobs."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run(job, **limits), jobs))
