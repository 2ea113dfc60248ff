"""The rest of Table 1: the sandbox against hostile programs, answer extraction, grading of HumanEval, MBPP,
LiveCodeBench, CRUXEval-O and MMLU-Pro with known-good and known-bad answers, pass@k, and eval.py end to end."""

import base64
import itertools
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zlib

import pytest
from conftest import ROOT, torchrun

import eval as E
from intuitor_harness import benchmarks as B
from intuitor_harness import sandbox

DATA = os.path.join(ROOT, "tests", "data")


def rows(name):
    return [json.loads(line) for line in open(os.path.join(DATA, f"{name}_tiny.jsonl"))]


def fenced(code):
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


# ---------------------------------------------------------------- the sandbox
def test_hostile_programs_fail_and_harm_nothing(tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    bystander = subprocess.Popen(["sleep", "60"])  # stands for the grader and everything else on the host
    homes, mkdtemp = [], tempfile.mkdtemp  # the working directories the sandbox makes for this test's programs
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: homes.append(mkdtemp(*a, **k)) or homes[-1])
    hostile = {
        "infinite loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "process pool": "import multiprocessing as m\nfor _ in range(64):\n    m.Process(target=print).start()",
        "subprocess": f"import subprocess\nsubprocess.run(['rm', '-rf', {str(tmp_path)!r}], check=True)",
        "10 GB": "x = bytearray(10 * 1024**3)\nprint(len(x))",
        "raise the limit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "delete": f"import os\nos.remove({str(precious)!r})",
        "delete tree": f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        "rename": f"import os\nos.rename({str(precious)!r}, 'stolen.txt')",
        "overwrite": f"open({str(precious)!r}, 'w').write('gone')",
        "read a secret": "import os\nprint(os.environ.get('HF_TOKEN'))\nassert os.environ.get('HF_TOKEN')",
        "print gigabytes": "while True:\n    print('x' * 1_000_000)",
        "kill a process": f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)",
    }
    good = {
        "arithmetic": "print(sum(range(10)))",
        "stdin": "print(input()[::-1])",
        "own directory": "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.remove('a.txt')\n"
        "tempfile.NamedTemporaryFile().write(b'1')\nprint('ok')",
        "future import": "from __future__ import annotations\nprint('ok')",
    }
    jobs = [sandbox.Job(src, stdin="abc\n") for src in [*hostile.values(), *good.values()]]
    try:
        results = sandbox.run_many(jobs, timeout=3, max_output_bytes=1 << 20)
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
    for name, result in zip(hostile, results):
        assert not result.passed, name
    for name, result in zip(good, results[len(hostile) :]):
        assert result.passed, (name, result.stderr)
    by_name = dict(zip([*hostile, *good], results))
    assert by_name["infinite loop"].status == by_name["sleep"].status == "timeout"
    assert len(by_name["print gigabytes"].stdout) <= 1 << 20
    assert "secret-token-value" not in by_name["read a secret"].stdout
    assert by_name["stdin"].stdout == "cba\n" and by_name["arithmetic"].stdout == "45\n"
    assert precious.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["precious.txt"]
    assert len(homes) == len(jobs) and not any(map(os.path.exists, homes))  # every working directory was removed


# ---------------------------------------------------------------- answer extraction
def test_last_code_block():
    assert B.last_code_block("a\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\n") == "y = 2\n"  # the last
    assert B.last_code_block("```py\nz = 3\n```") == "z = 3\n"
    assert B.last_code_block("```python\nstart = 1\nnever closed") == "start = 1\nnever closed"  # cut off
    assert B.last_code_block("def f():\n    return 1") is None  # prose or bare code is never run
    assert B.last_code_block("```python") is None


@pytest.mark.parametrize(
    "text,letter",
    [
        ("Oxygen is common, but the answer is (C).", "C"),
        ("The answer is: B", "B"),
        ("So $\\boxed{E}$", "E"),
        ("Answer: (D)", "D"),
        ("I would pick J here", "J"),  # the benchmark's last-letter fallback
        ("no idea", None),
        ("The answer is (C). Wait, the answer is (A).", "A"),
    ],
)
def test_extract_choice(text, letter):
    assert B.extract_choice(text) == letter


def test_extract_output():
    assert B.extract_output("reasoning...\n[ANSWER]'CBA'[/ANSWER]") == "'CBA'"
    assert B.extract_output("[ANSWER]assert f('abc') == 'CBA'[/ANSWER]") == "'CBA'"
    assert B.extract_output("It returns:\n```python\n[1, 3]\n```") == "[1, 3]"
    assert B.extract_output("thinking\n\n[1, 3]\n") == "[1, 3]"
    assert B.extract_output("   \n") is None


# ---------------------------------------------------------------- grading, known-good and known-bad answers
def grade(benchmark, problem, completions):
    return [g.correct for g in B.grade_batch(benchmark, [problem], [completions], timeout=5)[0]]


def test_humaneval_grading():
    problem = rows("humaneval")[0]
    body = problem["canonical_solution"]
    whole = problem["prompt"] + body  # the model rewrites the whole function
    wrong = "    return False\n"
    assert grade("humaneval", problem, [fenced(body), fenced(whole), fenced(wrong), body]) == [True, True, False, False]
    # leaving before the tests run is a failure, not a pass
    exits = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "    raise SystemExit\n"]
    assert grade("humaneval", problem, [fenced(code) for code in exits]) == [False, False, False]


def test_mbpp_grading():
    for problem in rows("mbpp"):  # includes task 367, whose setup code uses the solution's class
        assert grade("mbpp", problem, [fenced(problem["code"]), fenced("def nothing():\n    pass")]) == [True, False]


def test_livecodebench_grading_stdin_and_functional():
    stdin, functional, mean = rows("livecodebench")
    assert len(B.livecodebench_tests(stdin)) == 3  # one public + two compressed private tests
    right = "a, b = map(int, input().split())\nprint(a + b)"
    wrong_on_private = "a, b = map(int, input().split())\nprint(abs(a) + abs(b))"  # passes the public test
    then_exit = right + "\nexit()"  # a stdin program may end with exit(): it has no tests to skip
    assert grade("livecodebench", stdin, [fenced(right), fenced(wrong_on_private), fenced(then_exit)]) == [
        True,
        False,
        True,
    ]
    method = (
        "class Solution:\n    def twoLargest(self, nums: List[int]) -> List[int]:\n        return nlargest(2, nums)"
    )
    wrong = "class Solution:\n    def twoLargest(self, nums):\n        return sorted(nums)[-2:]"
    assert grade("livecodebench", functional, [fenced(method), fenced(wrong)]) == [True, False]
    floats = "n = int(input())\nxs = list(map(int, input().split()))\nprint(f'{sum(xs) / n:.2f}')"  # 1.50, 2.00
    assert grade("livecodebench", mean, [fenced(floats), fenced("print(0)")]) == [True, False]


def test_livecodebench_private_tests_never_unpickle_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    problem = dict(rows("livecodebench")[0])
    problem["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError):
        B.livecodebench_tests(problem)


def test_same_output():
    assert B.same_output("3\n", "3")
    assert B.same_output("1.50 2\n\n", "1.5 2.0")
    assert B.same_output("a  b\nc\n", "a b\nc")
    assert not B.same_output("3 4", "3")
    assert not B.same_output("3\n4", "3")
    assert not B.same_output("abc", "abd")


def test_cruxeval_grading():
    problems = rows("cruxeval")
    assert grade("cruxeval", problems[0], ["[ANSWER]'CBA'[/ANSWER]", "[ANSWER]'cba'[/ANSWER]", "no answer"]) == [
        True,
        False,
        False,
    ]
    assert grade("cruxeval", problems[1], ["[ANSWER]assert f([3, 4, 9, 10], 3) == [1, 3][/ANSWER]"]) == [True]
    assert grade("cruxeval", problems[2], [f"[ANSWER]{problems[2]['output']}[/ANSWER]"]) == [True]


def test_mmlu_pro_grading():
    problem = B.load_problems("mmlu_pro", os.path.join(DATA, "mmlu_pro_tiny.jsonl"))[0]
    assert "(C) Nitrogen" in problem["question"] and problem["gold"] == "C"
    assert grade("mmlu_pro", problem, ["The answer is (C)", "The answer is (A)", "dunno"]) == [True, False, False]


# ---------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (5, 2, 4), (6, 3, 3), (4, 4, 2), (7, 1, 7)])
def test_pass_at_k_against_enumeration(n, c, k):
    """The chance that a k-subset of n samples (c correct) holds a correct one, by listing every subset."""
    subsets = list(itertools.combinations(range(n), k))
    naive = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
    assert E.pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12)


# ---------------------------------------------------------------- eval.py end to end (tiny model: answers are noise)
def run_eval(tiny_dir, out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--max_new_tokens", "8"]
    p = subprocess.run([*cmd, "--output", str(out), *extra], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in open(out)], json.load(open(str(out).replace(".jsonl", ".summary.json")))


@pytest.mark.parametrize("name", ["humaneval", "mbpp", "livecodebench", "cruxeval", "mmlu_pro"])
def test_eval_script_runs_each_benchmark(tiny_dir, tmp_path, name):
    data = os.path.join(DATA, f"{name}_tiny.jsonl")
    records, summary = run_eval(tiny_dir, tmp_path / "r.jsonl", "--benchmark", name, "--data", data)
    assert len(records) == 3 and summary["n_problems"] == 3
    for key in ("problem", "completion", "extracted", "correct", "self_certainty", "length", "truncated"):
        assert key in records[0], key
    for key in ("accuracy", "accuracy_ci95", "answer_found_frac", "self_certainty_vs_correctness", "system_prompt"):
        assert key in summary, key
    assert summary["system_prompt"] == "neutral"  # recorded once, by name
    for key in B.BENCHMARKS[name].groups:
        assert f"accuracy_by_{key}" in summary
    assert "boxed_frac" not in summary  # a math-only field
    if name in ("humaneval", "mbpp", "livecodebench", "cruxeval"):  # programs: why each failed, and the counts
        assert all(("failure" in r) and (r["failure"] is None) == r["correct"] for r in records)
        assert sum(summary["failures"].values()) == sum(not r["correct"] for r in records)
        assert summary["isolation"] == sandbox.isolation()  # how the programs were isolated, recorded


def test_failure_reasons_of_programs():
    problem = B.load_problems("humaneval", os.path.join(DATA, "humaneval_tiny.jsonl"))[0]
    completions = [
        "no code here",
        "```python\ndef broken(:\n```",
        "```python\nimport time\ntime.sleep(30)\n```",
        "```python\ndef has_close_elements(numbers, threshold):\n    return None\n```",
        "```python\nraise RuntimeError('boom')\n```",
    ]
    graded = B.grade_batch("humaneval", [problem], [completions], timeout=2)[0]
    assert [g.failure for g in graded] == ["no code block", "syntax error", "timeout", "wrong answer", "runtime error"]
    assert not any(g.correct for g in graded)


def test_eval_help_names_compare_and_its_required_flag():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--help"], capture_output=True, text=True)
    usage = p.stdout.split("\n\n")[0]
    assert "--model MODEL" in usage and "[--model MODEL]" not in usage  # required, and shown so
    assert "python eval.py compare" in p.stdout
    assert E.wilson_interval(0, 10)[0] == 0.0 and E.wilson_interval(10, 10)[1] == 1.0


def test_eval_script_pass_at_k_and_selection(tiny_dir, tmp_path):
    data = os.path.join(DATA, "mbpp_tiny.jsonl")
    records, summary = run_eval(
        tiny_dir, tmp_path / "r.jsonl", "--benchmark", "mbpp", "--data", data, "--n", "4", "--temperature", "1"
    )
    assert all(len(r["samples"]) == 4 and set(r["selected"]) == {"self_certainty"} for r in records)
    assert [k for k in summary if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]
    assert summary["pass@1"] == pytest.approx(summary["accuracy"])  # pass@1 is the mean sample accuracy
    assert summary["pass@4"] == summary["best_of_n/pass@n"]


def test_code_eval_under_torchrun_gathers_all_problems_in_order(tiny_dir, tmp_path):
    args = ["--benchmark", "mbpp", "--data", os.path.join(DATA, "mbpp_tiny.jsonl"), "--batch_size", "1"]
    one, _ = run_eval(tiny_dir, tmp_path / "one.jsonl", *args)
    torchrun(2, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--max_new_tokens", "8", *args, "--output",
             str(tmp_path / "two.jsonl"))  # fmt: skip
    two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert [r["index"] for r in two] == [0, 1, 2]
    assert [(r["completion"], r["correct"]) for r in two] == [(r["completion"], r["correct"]) for r in one]


def test_eval_rejects_a_file_without_the_benchmark_columns(tiny_dir):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--benchmark", "humaneval", "--data",
         os.path.join(DATA, "mbpp_tiny.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error:") and "prompt" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--timeout", "0"], ["--timeout", "inf"], ["--grading_workers", "-1"]])
def test_eval_rejects_bad_grading_flags(flags):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", "m", "--benchmark", "mbpp", *flags]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- graded by an attacker (OS isolation)
WRONG = "def has_close_elements(numbers, threshold):\n    return False\n"  # fails HumanEval/0's tests


def attacks(host, secret_port, bystander):
    """name -> a wrong HumanEval/0 program that attacks the grader or the host in one way."""
    reimport = "import sys\ndel sys.modules['subprocess']\nimport subprocess\n"
    return {
        # fake passes
        "overwrite the tests": "open('tests.py', 'w').write('pass')\ntry:\n    open('/tmp/src/tests.py', 'w')\n"
        "except OSError:\n    pass\n",
        "rebind exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: 0\n",
        "forge the marker": "import os\nfor n in os.listdir('.'):\n    open('finished-' + n, 'w').close()\n"
        "print(open('/proc/self/cmdline').read())\nos._exit(0)\n",
        "set the flag, exit 0": "import sys, atexit, os\nsys.modules['__main__'].finished = True\n"
        "atexit.register(lambda: os._exit(0))\nsys.exit(0)\n",
        # cross-sample corruption: a process left behind, in a new session
        "leave a process": reimport + "subprocess.Popen(['sleep', '31.4159'], start_new_session=True)\n",
        # escapes
        "run commands": reimport + f"subprocess.run(['touch', {str(host / 'touched')!r}])\n",
        "spawn": "import multiprocessing as m\nm.set_start_method('spawn')\n"
        f"p = m.Process(target=open, args=({str(host / 'spawned')!r}, 'w'))\np.start()\np.join()\n",
        "FileIO": f"import io\nio.FileIO({str(host / 'fileio')!r}, 'w').write(b'x')\n",
        "keyword file calls": f"import os\nos.remove(path={str(host / 'precious.txt')!r})\n"
        f"os.rename(src={str(host / 'precious.txt')!r}, dst='x')\n",
        "mkdir": f"import os\nos.mkdir({str(host / 'made')!r})\n",
        "pidfd kill": f"import os, signal\nfd = os.pidfd_open({bystander})\nsignal.pidfd_send_signal(fd, 9)\n",
        "posix kill": f"import importlib, sys\ndel sys.modules['posix']\nimport posix\nposix.kill({bystander}, 9)\n",
        "parent environment": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n",
        "localhost": f"import socket\nsocket.create_connection(('127.0.0.1', {secret_port}), timeout=2)"
        ".sendall(b'x')\n",
        # resources
        "fork bomb": reimport + "while True:\n    subprocess.Popen(['sleep', '31.4159'])\n",
        "threads": "import threading, time\nfor _ in range(10000):\n"
        "    threading.Thread(target=time.sleep, args=(5,)).start()\n",
        "memory": "x = bytearray(10 * 1024**3)\n",
        "disk": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n    i += 1\n",
        "output": "while True:\n    print('x' * 1_000_000)\n",
    }


def survivors():
    """Processes of the attacks still running on the host (their sleep has a signature duration)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"31.4159" in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not sandbox.bubblewrap(), reason="needs bubblewrap (apt-get install bubblewrap)")
def test_attacks_through_grade_batch_fail_and_leave_the_host_intact(tmp_path, monkeypatch):
    import socket

    problem = B.load_problems("humaneval", os.path.join(DATA, "humaneval_tiny.jsonl"))[0]
    (tmp_path / "precious.txt").write_text("keep")
    monkeypatch.setenv("SECRET_TOKEN", "grader-secret")
    bystander = subprocess.Popen(["sleep", "120"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    hostile = attacks(tmp_path, server.getsockname()[1], bystander.pid)
    completions = [fenced(WRONG + attack) for attack in hostile.values()] + [fenced(WRONG)] * 10
    try:
        graded = B.grade_batch("humaneval", [problem], [completions], timeout=5)[0]
        with pytest.raises(TimeoutError):
            server.accept()  # nobody reached the grader's localhost
        assert bystander.poll() is None
    finally:
        bystander.kill()
        server.close()
    for name, g in zip([*hostile, *["plain wrong"] * 10], graded):
        assert not g.correct, name  # every attack, and every wrong sample graded after them, fails
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"] and (tmp_path / "precious.txt").read_text() == "keep"
    assert survivors() == []  # nothing left running: each sandbox's PID namespace died with it
    seen = sandbox.run(sandbox.Job(hostile["parent environment"]), timeout=5).stdout
    assert "grader-secret" not in seen  # the sandbox's /proc shows its own processes, their environment empty


def test_out_of_reach_by_design_an_object_that_equals_everything(tmp_path):
    """In-process tests compare with ==: a program returning an object whose __eq__ is always true passes,
    here as in HumanEval's own harness (README, The sandbox). This test pins that limit down."""
    problem = B.load_problems("humaneval", os.path.join(DATA, "humaneval_tiny.jsonl"))[0]
    cheat = "class Yes:\n    def __eq__(self, other):\n        return True\n\n" \
            "def has_close_elements(numbers, threshold):\n    return Yes()\n"  # fmt: skip
    assert B.grade_batch("humaneval", [problem], [[fenced(cheat)]], timeout=5)[0][0].correct


def test_cruxeval_predictions_are_values_never_code():
    problem = B.load_problems("cruxeval", os.path.join(DATA, "cruxeval_tiny.jsonl"))[0]
    injections = ["[ANSWER]0) or (1[/ANSWER]", "[ANSWER]__import__('os').system('true')[/ANSWER]",
                  "[ANSWER]type('E', (), {'__eq__': lambda s, o: True})()[/ANSWER]"]  # fmt: skip
    graded = B.grade_batch("cruxeval", [problem], [injections], timeout=5)[0]
    assert not any(g.correct for g in graded)


def test_programs_run_without_bubblewrap_too(monkeypatch, capsys):
    """The fallback: a plain process under the guard, announced once; good programs pass, wrong ones fail."""
    monkeypatch.setattr(sandbox, "bubblewrap", lambda: None)
    monkeypatch.delattr(sandbox.isolation, "said", raising=False)
    jobs = [
        sandbox.Job("def f(x):\n    return 2 * x", tests="assert f(2) == 4"),
        sandbox.Job("def f(x):\n    return 3 * x", tests="assert f(2) == 4"),
        sandbox.Job("open('tests.py', 'w').write('pass')\ndef f(x):\n    return 3 * x", tests="assert f(2) == 4"),
    ]
    assert [r.passed for r in sandbox.run_many(jobs, timeout=5)] == [True, False, False]
    assert capsys.readouterr().err.count("bwrap is not usable here") == 1


REFERENCE_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_DATA, "humaneval.jsonl")), reason="no local copies")
def test_every_reference_solution_passes():
    """All 164 HumanEval and 500 MBPP reference solutions pass in the sandbox."""
    for name, file, solution in (("humaneval", "humaneval.jsonl", "canonical_solution"),
                                 ("mbpp", "mbpp_test.jsonl", "code")):  # fmt: skip
        problems = B.load_problems(name, os.path.join(REFERENCE_DATA, file))
        rows = [json.loads(line) for line in open(os.path.join(REFERENCE_DATA, file))]
        texts = [[fenced(row[solution])] for row in rows]
        graded = B.grade_batch(name, problems, texts, timeout=20)
        failed = [p.get("task_id") for p, g in zip(problems, graded) if not g[0].correct]
        assert failed == [], (name, failed)
