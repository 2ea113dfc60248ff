"""Grades that cannot fail silently: the sandbox sees the interpreter it runs (a venv under /tmp included), a
self-test stops a grader that cannot run programs, gold answers grade correct against themselves, a code
problem without readable tests is refused at load, `compare` pairs only like with like, and one --output holds
one evaluation at a time."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT

import eval as E
from intuitor_harness import sandbox
from intuitor_harness import tasks as T

DATA = os.path.join(ROOT, "tests", "data")
SHARED = os.path.join(ROOT, "..", "shared", "data")
needs_bwrap = pytest.mark.skipif(sandbox.bubblewrap() is None, reason="bubblewrap cannot start a sandbox here")


def one_error_line(p, needle):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]


# ----------------------------------------------------------------------------- the interpreter under /tmp
GRADE_IN_VENV = """
import json, sys
from intuitor_harness import sandbox
if sys.argv[1] == "hide":  # the sandbox as it was: nothing of the interpreter bound back
    sandbox.interpreter_paths = lambda: []
    sandbox.self_test()
row = json.loads(open(sys.argv[2]).readline())  # HumanEval/0
tests = row["test"] + "\\ncheck(" + row["entry_point"] + ")"
right = sandbox.Job(row["prompt"] + row["canonical_solution"], tests=tests)
wrong = sandbox.Job(row["prompt"] + "    return False\\n", tests=tests)
stdin = sandbox.Job("print(sum(map(int, input().split())))", stdin="2 3")
results = sandbox.run_many([right, wrong, stdin], timeout=10)
print(json.dumps([sandbox.interpreter_paths(), [r.passed for r in results], results[2].stdout, sandbox.self_test()]))
"""


@needs_bwrap
@pytest.mark.parametrize("copies", [False, True], ids=["venv", "venv --copies"])
def test_a_venv_under_tmp_grades_through_the_sandbox(tmp_path, copies):
    """A venv made under the temporary directory (as on cluster scratch space): the sandbox's own /tmp would
    hide its interpreter, so every program failed and accuracy read 0 without a word."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *(["--copies"] if copies else []), str(venv)],
                   check=True)  # fmt: skip
    python, env = str(venv / "bin" / "python"), dict(os.environ, PYTHONPATH=ROOT)
    humaneval = os.path.join(DATA, "humaneval_tiny.jsonl")
    p = subprocess.run([python, "-c", GRADE_IN_VENV, "bind", humaneval], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    bound, passed, stdout, isolation = json.loads(p.stdout)
    assert passed == [True, False, True] and stdout.strip() == "5" and isolation == "bubblewrap"
    assert bound == [str(venv)]  # the venv alone: nothing else of /tmp becomes visible
    # without the binding the self-test stops the grader in one line, with the probe's stderr
    p = subprocess.run([python, "-c", GRADE_IN_VENV, "hide", humaneval], capture_output=True, text=True, env=env)
    one_error_line(p, "the code grader failed its self-test (bubblewrap isolation): a function and its tests failed")
    assert "execvp" in p.stderr


@needs_bwrap
def test_the_rest_of_tmp_stays_invisible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("grader's file")
    result = sandbox.run(sandbox.Job(f"print(open({str(secret)!r}).read())"), timeout=10)
    assert not result.passed and "grader's file" not in result.stdout


def test_a_grader_that_cannot_run_programs_stops_before_the_model_loads(tmp_path, monkeypatch, tiny_dir):
    broken = (("a function and its tests", sandbox.Job("raise OSError('cannot start')"), None, True),)
    monkeypatch.setattr(sandbox, "PROBES", broken)
    sandbox.self_test.cache_clear()
    monkeypatch.setattr(E.process, "load_model", lambda *a: pytest.fail("the model loaded"))
    args = ["--model", tiny_dir, "--benchmark", "humaneval", "--data", os.path.join(DATA, "humaneval_tiny.jsonl"),
            "--output", str(tmp_path / "he.jsonl")]  # fmt: skip
    try:
        with pytest.raises(SystemExit) as stop:
            E.main(args)
    finally:
        sandbox.self_test.cache_clear()
        E.CLAIMS.pop().close()
    assert str(stop.value).startswith("error: the code grader failed its self-test") and "cannot start" in str(
        stop.value
    )


def test_the_self_test_passes_here_and_names_the_isolation():
    assert sandbox.self_test() in ("bubblewrap", "process")


# ----------------------------------------------------------------------------- gold answers against themselves
@pytest.mark.parametrize("pred,gold,correct", [
    ("\\$18.90", "\\$18.90", True), ("18.9", "\\$18.90", True), ("19", "\\$18.90", False),
    ("32348", "\\$32,\\!348", True), ("\\$32,\\!348", "\\$32,\\!348", True), ("-0.5", "-\\$0.50", True),
    ("20", "20\\%", True), ("5", "5\\text{ cm}", True), ("32,348", "32348", True),
])  # fmt: skip
def test_currency_separators_units_and_percent(pred, gold, correct):
    assert T.is_correct(pred, gold) is correct


def gold_files():
    shipped = [(os.path.join(ROOT, "data", f"arithmetic_{s}.jsonl"), "number") for s in ("train", "test")]
    hub = (("math500.jsonl", "boxed"), ("gsm8k_test.jsonl", "number"), ("math_train4500.jsonl", "boxed"))
    local = [(os.path.join(SHARED, f), fmt) for f, fmt in hub]
    return shipped + [(path, fmt) for path, fmt in local if os.path.exists(path)]


@pytest.mark.parametrize("path,answer_format", gold_files(), ids=lambda v: os.path.basename(str(v)))
def test_every_gold_answer_is_correct_against_itself(path, answer_format):
    """MATH-500, GSM8K and the MATH training copy (hub columns, where the local copies exist) and the shipped
    arithmetic sets: each gold answer graded against itself, and against itself inside \\boxed{}."""
    rows = T.load_rows(path, "train")

    def boxed(g):
        return T.extract_answer(f"so \\boxed{{{g}}}.", answer_format)

    wrong = [g for g in T.gold_answers(rows) if not (T.is_correct(g, g) and T.is_correct(boxed(g), g))]
    assert wrong == []


# ----------------------------------------------------------------------------- no test, no pass
def livecodebench_row(**changes):
    row = json.loads(open(os.path.join(DATA, "livecodebench_tiny.jsonl")).readline())
    return {**row, **changes}


@pytest.mark.parametrize("name,row,needle", [
    ("livecodebench", livecodebench_row(public_test_cases="[]", private_test_cases="[]"), "has no tests"),
    ("livecodebench", livecodebench_row(public_test_cases="not json"), "its tests cannot be read (JSONDecodeError"),
    ("livecodebench", livecodebench_row(private_test_cases="%%%not base64%%%"), "its tests cannot be read"),
    ("mbpp", {**json.loads(open(os.path.join(DATA, "mbpp_tiny.jsonl")).readline()), "test_list": []}, "has no tests"),
])  # fmt: skip
def test_a_code_problem_without_readable_tests_is_refused_at_load(tmp_path, name, row, needle):
    rows = [json.loads(line) for line in open(os.path.join(DATA, f"{name}_tiny.jsonl"))]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + [row]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", "never-loaded", "--benchmark",
                        name, "--data", str(data), "--output", str(tmp_path / "out.jsonl")],
                       capture_output=True, text=True)  # fmt: skip
    which = row.get("question_id") or row.get("task_id")
    one_error_line(p, f"problem {which}")
    assert needle in p.stderr and not (tmp_path / "out.jsonl").exists()


# ----------------------------------------------------------------------------- compare, like with like
def write_eval(folder, name, benchmark, correct, summary=True, problems=None):
    path = folder / f"{name}.jsonl"
    problems = problems or [f"q{i}" for i in range(len(correct))]
    path.write_text("".join(json.dumps({"index": i, "problem": q, "correct": c}) + "\n"
                            for i, (q, c) in enumerate(zip(problems, correct))))  # fmt: skip
    if summary:
        s = {"benchmark": benchmark, "accuracy": sum(correct) / len(correct), "accuracy_ci95": [0.0, 1.0],
             "mean_length": 5.0, "truncated_frac": 0.0, "mean_self_certainty": 1.0,
             "self_certainty_vs_correctness": {}}  # fmt: skip
        (folder / f"{name}.summary.json").write_text(json.dumps(s))
    return str(path)


def compare(*paths):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "compare", *paths]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_compare_pairs_only_the_same_benchmark_and_problems(tmp_path):
    base = write_eval(tmp_path, "base", "gsm8k", [0, 1, 0, 1])
    assert compare(base, write_eval(tmp_path, "same", "gsm8k", [1, 1, 0, 1])).returncode == 0
    one_error_line(compare(base, write_eval(tmp_path, "other", "arithmetic", [1, 1, 0, 1])),
                   "is arithmetic, " + base + " is gsm8k; compare one benchmark")  # fmt: skip
    one_error_line(compare(base, write_eval(tmp_path, "short", "gsm8k", [1, 1, 0])), "holds 3 problems")
    one_error_line(compare(base, write_eval(tmp_path, "texts", "gsm8k", [1, 1, 0, 1], problems=list("abcd"))),
                   "hold different problems")  # fmt: skip
    one_error_line(compare(base, write_eval(tmp_path, "bare", "gsm8k", [1, 1, 0, 1], summary=False)),
                   f"{tmp_path / 'bare.summary.json'} is missing")  # fmt: skip


# ----------------------------------------------------------------------------- one --output, one evaluation
def test_a_second_evaluation_on_the_same_output_is_refused(tmp_path, tiny_dir):
    output = str(tmp_path / "eval.jsonl")
    args = SimpleNamespace(output=output, benchmark="arithmetic", overwrite=False)
    assert E.output_path(args) == output  # this process evaluates into it now
    try:
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--benchmark", "arithmetic",
               "--limit", "2", "--output", output]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
        one_error_line(p, "is being written by another evaluation")
        assert os.path.getsize(output) == 0  # nothing of the second one mixed in
    finally:
        E.CLAIMS.pop().close()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--benchmark",
                        "arithmetic", "--limit", "2", "--max_new_tokens", "4", "--output", output],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr  # once the first has ended, the path is free again
