"""Running model-written Python, which can do anything, without letting it harm the machine that grades it.

    sandbox.run_many([sandbox.Job("def f(x):\n    return 2 * x", tests="assert f(2) == 4")])  # [Result(passed=True..)]

With bubblewrap (`bwrap`, Debian's `bubblewrap`) each program runs in a sandbox of its own:
  - its own PID, network, IPC, UTS and mount namespaces: it sees no other process, reaches no network (not even
    the host's localhost), and when the sandbox ends every process it started ends with it;
  - a read-only view of the system, a private /tmp, and one writable directory that no other sample shares;
  - uid 65534 (nobody), an empty environment, stdin from the test's input;
  - limits set on itself before the program's first line (CPU seconds, address space, size of any file it
    writes, so printing gigabytes ends at the cap) and a wall-clock timeout that kills the whole sandbox.
Without bwrap (macOS, a container without user namespaces) it falls back, with one line saying so, to a plain
process in its own session and directory (as nobody when the grader is root and nobody can run this Python).

What decides the verdict is out of the program's reach as far as a process can put it: the program and its
tests are read into memory before the program runs (so it cannot rewrite them), and "finished" is a secret
that the runner receives through a pipe and writes back through another only after the tests ran to the end
(no file to forge, nothing in argv or the environment). What in-process tests cannot stop, here as in
HumanEval's execution.py, LiveCodeBench's and CRUXEval's harnesses: a program that patches the interpreter it
shares with its tests (an object whose __eq__ is always true, a rebound builtin, reading the runner's frame).
A seatbelt guard also disables killing, forking, exec and writes outside the sample's directory; Python code
can undo it, which is why the namespaces, not the guard, are the isolation.
Programs run in parallel, one per core by default.
"""

import contextlib
import functools
import itertools
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
def main():
    secret = os.read({token_fd}, 64)  # the "finished" token: in no file, argument or environment variable
    os.close({token_fd})
    done, read_source = {done_fd}, open_file
    sources = {source_dir!r}
    program = read_source(os.path.join(sources, "program.py")).read()  # both read before the program runs
    tests = read_source(os.path.join(sources, "tests.py")).read()
    run_code, compile_code = exec, compile  # a program that rebinds the builtins cannot skip the tests
    namespace = {{"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}}
    finished = False
    try:
        run_code(compile_code(program, "program.py", "exec"), namespace)
        if tests:  # sys.exit(0) inside the program must not skip them
            run_code(compile_code(tests, "tests.py", "exec"), namespace)
        finished = True
    except SystemExit as e:
        finished = not tests and e.code in (None, 0)
        raise
    finally:
        if finished:
            os.write(done, secret)
main()
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


@functools.cache
def bubblewrap():
    """The bwrap executable if it can start a sandbox here (user namespaces allowed), else None."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = subprocess.run([path, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True)
    return path if probe.returncode == 0 else None


@functools.cache
def bubblewrap_as_nobody():
    """Whether bwrap can be started by user nobody (unprivileged user namespaces), so that a root grader's
    sandboxes map to nobody on the host, where the process limit (RLIMIT_NPROC) holds; mapped to root it would
    not. Needs this interpreter to be usable by other users."""
    if not (bubblewrap() and os.geteuid() == 0 and others_can_run_python()):
        return False
    probe = subprocess.run([bubblewrap(), "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True,
                           user=NOBODY, group=NOBODY, extra_groups=[])  # fmt: skip
    return probe.returncode == 0


CGROUP_V1 = "/sys/fs/cgroup"  # cgroup v1: one hierarchy per controller, /sys/fs/cgroup/memory and .../pids
SAMPLES = itertools.count()


class SampleCgroup:
    """The memory and process bounds of one sample, over all of its processes together (RLIMIT_AS bounds each
    process alone; RLIMIT_NPROC counts a user's processes, and not root's): a cgroup of its own in the memory
    and pids controllers of cgroup v1, where this process (root) may make one. `procs` lists the files a
    process writes its pid to in order to join; `usable()` says whether there is one at all."""

    def __init__(self, memory_bytes, max_processes, owner):
        self.paths, self.procs = [], []
        name = f"intuitor-sandbox-{os.getpid()}-{next(SAMPLES)}"
        settings = {"memory": {"memory.limit_in_bytes": memory_bytes}, "pids": {"pids.max": max_processes}}
        try:
            for controller, limits in settings.items():
                path = os.path.join(CGROUP_V1, controller, name)
                os.mkdir(path)
                self.paths.append(path)
                for key, value in limits.items():
                    with open(os.path.join(path, key), "w") as f:
                        f.write(str(value))
                procs = os.path.join(path, "cgroup.procs")
                os.chown(procs, owner, -1)  # the sample's first process moves itself in, as its own user
                self.procs.append(procs)
        except OSError:  # no cgroup v1 here, or not root: the per-process limits alone
            self.close()
            self.paths, self.procs = [], []

    @staticmethod
    @functools.cache
    def usable():
        probe = SampleCgroup(1 << 30, 64, os.geteuid())
        probe.close()
        return bool(probe.procs)

    def wrap(self, command):
        """`command`, started by a shell that first moves itself into the cgroups (so every process of the sample,
        the first one included, is counted)."""
        if not self.procs:
            return command
        join = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", join, "sh", *self.procs, "--", *command]

    def close(self):
        """Kill whatever is left in the cgroups, then remove them."""
        for path in reversed(self.paths):
            for _ in range(50):
                try:
                    for pid in open(os.path.join(path, "cgroup.procs")).read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), 9)
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.02)


def isolation():
    """'bubblewrap', or 'process' (the fallback), said once in one line when it is the fallback."""
    if bubblewrap():
        return "bubblewrap"
    if not getattr(isolation, "said", False):
        isolation.said = True
        print("sandbox: bwrap is not usable here, so programs run as plain processes under an in-process guard; "
              "install bubblewrap (apt-get install bubblewrap) for OS isolation", file=sys.stderr)  # fmt: skip
    return "process"


HIDDEN = ("/tmp", "/proc", "/dev")  # what the sandbox mounts afresh over the read-only view of the system


@functools.cache
def interpreter_paths():
    """The interpreter's own paths that the sandbox's fresh mounts would hide (a venv made under /tmp, a Python
    unpacked on scratch space): its prefixes (the venv's and the base installation's), the folder of its real
    executable and its standard library, as written and resolved, outermost only. Bound read-only back in
    their place; nothing else of /tmp is visible."""
    stdlib = os.path.dirname(os.__file__)
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, stdlib,
                  os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}  # fmt: skip
    paths = {os.path.abspath(p) for c in candidates if c for p in (c, os.path.realpath(c))}
    hidden = {p for p in paths if any(p == h or p.startswith(h + os.sep) for h in HIDDEN) and os.path.exists(p)}
    return sorted(p for p in hidden if not any(p.startswith(q + os.sep) for q in hidden))


def sandboxed(command, sources, env, disk_bytes):
    """`command` inside a bubblewrap sandbox: `sources` read-only at /tmp/src, and a private tmpfs of
    `disk_bytes` at /tmp/work, its working directory and the only place it can write. /tmp around it is a tmpfs
    of 1 MiB, /dev is read-only (its device nodes still work: /dev/null takes any amount), so a sample can
    write at most disk_bytes + 1 MiB; the interpreter's own paths under /tmp (interpreter_paths) stay
    visible, read-only."""
    inside = env | {"HOME": "/tmp/work", "TMPDIR": "/tmp/work"}
    interpreter = [x for path in interpreter_paths() for x in ("--ro-bind", path, path)]
    return [bubblewrap(), "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--size", str(1 << 20), "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            *interpreter, "--ro-bind", sources, "/tmp/src",
            "--size", str(disk_bytes), "--tmpfs", "/tmp/work", "--chdir", "/tmp/work",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--clearenv",
            *[x for key, value in inside.items() for x in ("--setenv", key, value)], "--", *command]  # fmt: skip


def run(job, timeout=10.0, memory_mb=2048, max_processes=32, max_output_bytes=16 << 20, disk_mb=64):
    """Run one program; never raises for anything the program does."""
    isolated = isolation() == "bubblewrap"
    # a root grader runs the sample as nobody: bwrap itself when it can (its namespace then maps to nobody, not
    # to root, so the process limit holds), the plain process in the fallback
    as_nobody = os.geteuid() == 0 and (bubblewrap_as_nobody() if isolated else others_can_run_python())
    uid = NOBODY if as_nobody else os.geteuid()
    limits = {
        "RLIMIT_CPU": int(timeout) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": max_output_bytes,
        "RLIMIT_NPROC": processes_of(uid) + max_processes,
        "RLIMIT_CORE": 0,
    }
    home = tempfile.mkdtemp(prefix="sandbox-")
    cgroup = SampleCgroup(memory_mb << 20, max_processes + 3, uid)  # + sh, bwrap and its init
    token_read, token_write = os.pipe()
    done_read, done_write = os.pipe()
    open_fds = {token_read, token_write, done_read, done_write}

    def close(fd):  # once only: threads grading other samples reuse freed descriptor numbers
        if fd in open_fds:
            open_fds.discard(fd)
            os.close(fd)

    try:
        for name, text in (("program.py", job.source), ("tests.py", job.tests), ("stdin.txt", job.stdin)):
            # a lone surrogate ('\\udcff') is written as the bytes it stands for: not UTF-8, so Python refuses
            # the program, a failed sample; the grader goes on
            with open(os.path.join(home, name), "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(text)
        if as_nobody:
            for name in ("", "program.py", "tests.py", "stdin.txt"):
                os.chown(os.path.join(home, name), NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        secret = secrets.token_hex(16).encode()
        os.write(token_write, secret)
        close(token_write)
        runner = RUNNER.format(limits=limits, blocked=BLOCKED, inside_only=INSIDE_ONLY, token_fd=token_read,
                               done_fd=done_write, source_dir="/tmp/src" if isolated else home)  # fmt: skip
        command = [sys.executable, "-I", "-B", "-c", runner]
        if isolated:
            command = sandboxed(command, home, env, disk_mb << 20)
        command = cgroup.wrap(command)
        start = time.perf_counter()
        with (
            open(os.path.join(home, "stdin.txt")) as stdin,
            open(os.path.join(home, "stdout.txt"), "w") as stdout,
            open(os.path.join(home, "stderr.txt"), "w") as stderr,
        ):
            try:
                process = subprocess.Popen(
                    command,
                    cwd=home,
                    env=env,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=(token_read, done_write),
                    **({"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}),
                )
            except OSError as e:  # could not start it (out of processes or files): a failed sample
                return Result(False, "failed", -1, "", f"sandbox: cannot start the program: {e}", 0.0)
            finally:
                close(token_read)
                close(done_write)
            try:
                returncode, status = process.wait(timeout=timeout), None
            except subprocess.TimeoutExpired:
                returncode, status = -9, "timeout"
            try:  # the whole group, on timeout and after a normal exit alike (bwrap's sandbox dies with it)
                os.killpg(process.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        seconds = time.perf_counter() - start
        os.set_blocking(done_read, False)
        try:
            finished = os.read(done_read, 64) == secret
        except BlockingIOError:
            finished = False

        def read(name, size):
            with open(os.path.join(home, name), errors="replace") as f:
                return f.read(size)

        status = status or ("passed" if returncode == 0 and finished else "failed")
        stderr_text = read("stderr.txt", max_output_bytes)[-2000:]
        return Result(
            status == "passed", status, returncode, read("stdout.txt", max_output_bytes), stderr_text, seconds
        )
    except (OSError, ValueError) as e:  # the grader could not set the sample up: a failed sample, never a crash
        return Result(False, "failed", -1, "", f"sandbox: cannot run the program: {type(e).__name__}: {e}", 0.0)
    finally:
        for fd in list(open_fds):
            close(fd)
        cgroup.close()
        shutil.rmtree(home, ignore_errors=True)


# Known answers for self_test: (what, job, the stdout it must print or None, whether it must pass)
GOOD_FUNCTION, BAD_FUNCTION = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
PROBES = (
    ("a function and its tests", Job(GOOD_FUNCTION, tests="assert add(2, 3) == 5\n"), None, True),
    ("a function failing its tests", Job(BAD_FUNCTION, tests="assert add(2, 3) == 5\n"), None, False),
    ("a program reading stdin", Job("print(sum(map(int, input().split())))\n", stdin="2 3\n"), "5", True),
    ("a program raising", Job("raise ValueError('wrong')\n", stdin="2 3\n"), "5", False),
)


@functools.cache
def self_test(timeout=10.0):
    """Before the first grading in a process: under the isolation in use, a known-good program (a function with
    its tests; a stdin/stdout program) must pass and a known-bad one must fail. Otherwise every sample would be
    graded wrong without a word, so the process ends with one `error:` line naming what failed, the probe's
    stderr and the fix. Returns the isolation used ('bubblewrap' or 'process')."""
    used = isolation()
    results = run_many([job for _, job, _, _ in PROBES], timeout=timeout)
    for (what, _, want_stdout, should_pass), result in zip(PROBES, results):
        passed = result.passed and (want_stdout is None or result.stdout.strip() == want_stdout)
        if passed != should_pass:
            said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}, no stderr"])[-1]
            verdict = "failed" if should_pass else "passed"
            raise SystemExit(
                f"error: the code grader failed its self-test ({used} isolation): {what} {verdict} ({said}); "
                f"every sample would be graded wrong. Check that `{sys.executable} -c 'print(1)'` runs, that its "
                "files are readable by all users (programs run as nobody) and that `bwrap --ro-bind / / true` works"
            )
    return used


def run_many(jobs, workers=None, **limits):
    """Run jobs in parallel (default one per core); results in the order of the jobs."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run(job, **limits), jobs))
