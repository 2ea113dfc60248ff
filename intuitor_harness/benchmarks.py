"""Table 1's benchmarks: what each asks and how its answers are graded.

In the spirit of nanochat's tasks/: where
the problems come from (hub, or a local copy with the hub's columns), the user turn built from a row, how an
answer is read from a completion (a \\boxed{} or a number, a fenced program, a letter, a value) and checked
(math-verify, running the program against the benchmark's tests in sandbox.py, comparing letters).
eval.py samples the model and keeps the statistics.
"""

import ast
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from intuitor_harness import sandbox, tasks
from intuitor_harness.process import check_hub, die
from intuitor_harness.tasks import extract_answer, is_correct

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where data/ ships


# ----------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's problems come from, what the model is asked, and how its answer is graded."""

    hub: str  # dataset id on the hub ("" = local file only)
    config: str | None
    columns: tuple  # the columns a problem needs (checked in --data files)
    ask: Callable[[dict], str]  # the user turn, from a row
    grade: Literal["math", "choice", "output", "code"]  # see grade_batch
    answer_format: str = ""  # math: "boxed" or "number" (intuitor_harness.tasks.extract_answer)
    groups: tuple = ()  # columns accuracy is also broken down by


def code_task(text):
    return f"{text.strip()}\n\nWrite the solution in Python in a single ```python code block."


def ask_humaneval(row):
    return code_task(f"Complete this function:\n```python\n{row['prompt'].rstrip()}\n```")


def ask_mbpp(row):
    return code_task(f"{row['text']}\nYour code should pass these tests:\n" + "\n".join(row["test_list"]))


def ask_livecodebench(row):
    if row["starter_code"].strip():
        form = f"Complete this starter code:\n```python\n{row['starter_code'].rstrip()}\n```"
    else:
        form = "The program reads its input from stdin and writes the answer to stdout."
    return code_task(f"{row['question_content'].strip()}\n\n{form}")


def ask_cruxeval(row):
    return (
        f"What does `f({row['input']})` return, for this Python function?\n```python\n{row['code'].rstrip()}\n```\n"
        "Give the value as a Python literal between [ANSWER] and [/ANSWER], e.g. [ANSWER]'abc'[/ANSWER]."
    )


def ask_mmlu_pro(row):
    options = "\n".join(f"({letter}) {option}" for letter, option in zip(LETTERS, row["options"]))
    return f"{row['question'].strip()}\n\n{options}\n\nEnd your reply with 'The answer is (X)', X the option's letter."


def column(name):
    return lambda row: row[name]


LETTERS = "ABCDEFGHIJ"
LIVECODEBENCH_FILES = [f"test{k}.jsonl" for k in ("", 2, 3, 4, 5, 6)]  # release_v6: problems of releases 1 to 6
LIVECODEBENCH_COLUMNS = ("question_content", "starter_code", "public_test_cases", "private_test_cases", "metadata")
# fmt: off
BENCHMARKS = {
    # data/arithmetic_test.jsonl, shipped (python -m intuitor_harness.tasks arithmetic data)
    "arithmetic": Benchmark("", None, ("question",), column("question"), "math", answer_format="number"),
    "gsm8k": Benchmark("openai/gsm8k", "main", ("question",), column("question"), "math", answer_format="number"),
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, ("problem",), column("problem"), "math",
                         answer_format="boxed", groups=("subject", "level")),
    "humaneval": Benchmark("openai/openai_humaneval", None, ("prompt", "test", "entry_point"), ask_humaneval, "code"),
    "mbpp": Benchmark("google-research-datasets/mbpp", "full", ("text", "test_list", "test_setup_code"), ask_mbpp,
                      "code"),
    "livecodebench": Benchmark("livecodebench/code_generation_lite", None, LIVECODEBENCH_COLUMNS, ask_livecodebench,
                               "code", groups=("difficulty", "platform")),
    "cruxeval": Benchmark("cruxeval-org/cruxeval", None, ("code", "input", "output"), ask_cruxeval, "output"),
    "mmlu_pro": Benchmark("TIGER-Lab/MMLU-Pro", None, ("question", "options", "answer"), ask_mmlu_pro, "choice",
                          groups=("category",)),
}
# fmt: on
NEUTRAL_SYSTEM_PROMPT = "You are a helpful AI Assistant. Think step by step, then answer in the form the user asks for."


def load_problems(name, data="", limit=0):
    """Problems of a benchmark (hub, or a local file `data` with the hub dataset's columns): each row, with `question`
    (the user turn) and `gold` (the answer to match, for math, choice and CRUXEval-O; None for programs)."""
    spec = BENCHMARKS[name]
    if not data and not spec.hub:  # shipped with the repository
        data = os.path.join(PROJECT_ROOT, "data", "arithmetic_test.jsonl")
    if data:
        rows = tasks.load_rows(data, "test", flag="--data")
    else:
        from datasets import load_dataset

        check_hub([("--benchmark", spec.hub, "dataset")])
        try:
            if name == "livecodebench":  # its JSON files (datasets >= 4 runs no loading scripts)
                files = [f"hf://datasets/{spec.hub}/{file}" for file in LIVECODEBENCH_FILES]
                rows = load_dataset("json", data_files=files, split="train")
            else:
                rows = load_dataset(spec.hub, spec.config, split="test")
        except Exception as e:  # noqa: BLE001
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            die(f"cannot load {spec.hub} ({reason}); pass a local file with --data")
    source = f"--data {data!r}" if data else spec.hub
    missing = [column for column in spec.columns if column not in rows.column_names]
    if missing:
        die(
            f"{source} has no column {', '.join(missing)} (columns: {', '.join(rows.column_names)}); "
            f"--benchmark {name} needs the hub dataset's columns: {', '.join(spec.columns)}"
        )
    tasks.check_texts(rows, spec.columns[0], source)
    golds = [None] * len(rows)  # programs are graded by their tests
    if spec.grade == "math":
        golds = tasks.gold_answers(rows)
        if all(gold is None for gold in golds):
            die(f"--data has no gold answers (an `answer` or `solution` column) for --benchmark {name}")
        tasks.check_every_gold(golds, source)
    elif spec.grade in ("choice", "output"):
        golds = rows["answer" if spec.grade == "choice" else "output"]
    problems = [dict(row, question=spec.ask(row), gold=gold) for row, gold in zip(rows, golds)]
    problems = problems[:limit] if limit else problems
    if spec.grade == "code":
        for k, problem in enumerate(problems):
            problem["tests"] = checked_tests(name, problem, k, source)
    return problems


def checked_tests(name, problem, k, source):
    """A code problem's tests, read and checked at load, before anything is sampled: a problem without tests
    would pass any program, and malformed tests would fail only after all the sampling. Either ends the run
    with one line naming the problem (the choice here: refuse the file rather than drop problems silently)."""
    which = problem.get("question_id") or problem.get("task_id") or f"row {k + 1}"
    try:
        if name == "humaneval":
            tests = [problem["test"]] if problem["test"].strip() else []
        elif name == "mbpp":
            tests = list(problem["test_list"])
        else:
            tests = livecodebench_tests(problem)
            for test in tests:
                if not (isinstance(test["input"], str) and isinstance(test["output"], str)):
                    raise TypeError("a test needs text input and output")
                if test["testtype"] == "functional":  # arguments one JSON value a line, the result JSON
                    if not json.loads(problem["metadata"]).get("func_name"):
                        raise KeyError("metadata names no func_name")
                    for text in [*test["input"].split("\n"), test["output"]]:
                        json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSON, base64, zlib, pickle, a missing key: one line, whatever it is
        reason = (str(e).splitlines() or [""])[0][:200]
        die(f"{source}: problem {which}: its tests cannot be read ({type(e).__name__}: {reason}); "
            "fix or remove that row")  # fmt: skip
    if not tests:
        die(f"{source}: problem {which} has no tests, so any program would pass it; add its tests or remove the row")
    return tests


# ----------------------------------------------------------------------------- answers: code, a letter, a value
FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def last_code_block(text):
    """The program in a completion: its last fenced code block (```python or bare ```); an opening fence
    never closed (a completion cut at the token limit) runs to the end. None without a fence: the sample
    fails, as a math answer without \\boxed{} does; prose is never run as code."""
    blocks = FENCE.findall(text)
    if text.count("```") % 2 == 1:  # the last fence opens a block that was never closed
        tail = text[text.rfind("```") + 3 :]
        return tail.split("\n", 1)[1] if "\n" in tail else None
    return blocks[-1] if blocks else None


def extract_choice(text):
    """MMLU-Pro's answer letter, by the first pattern that matches: the last 'answer is (X)', the last
    \\boxed{X}, the last 'Answer: X', else the last stand-alone capital A-J (the benchmark's own fallback,
    which its script follows with a random guess; here no letter is no answer, graded wrong)."""
    for pattern in (
        r"answer is:?\s*\(?([A-J])\b",
        r"\\boxed\{\(?([A-J])\)?\}",
        r"[Aa]nswer:\s*\(?([A-J])\b",
        r"\b([A-J])\b",
    ):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    return None


def extract_output(text):
    """CRUXEval-O's predicted value: the last [ANSWER]...[/ANSWER], else the last code block, else the last
    non-empty line; of an assertion `assert f(...) == v`, the v."""
    tagged = re.findall(r"\[ANSWER\](.*?)\[/ANSWER\]", text, re.DOTALL)
    block = tagged[-1] if tagged else last_code_block(text)
    lines = [line for line in (block if block is not None else text).strip().splitlines() if line.strip()]
    if not lines:
        return None
    value = lines[-1].strip() if block is None else "\n".join(lines).strip()
    if value.startswith("assert") and "==" in value:
        value = value.split("==", 1)[1].strip()
    return value or None


# ----------------------------------------------------------------------------- grading
LIVECODEBENCH_IMPORTS = (
    "from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
    "from heapq import *\nfrom bisect import *\nimport bisect, collections, functools, heapq, itertools, math, re, "
    "string, sys\n\n"
)


def literal(text):
    """(value, True) for a Python literal (numbers, strings, tuples, lists, dicts, sets, None, booleans), else
    (None, False): nothing is executed, so no object with a rigged __eq__ can come out of it."""
    try:
        return ast.literal_eval(text.strip()), True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None, False


class Prediction:
    """A CRUXEval-O prediction, matched by value against what the function printed."""

    def __init__(self, text):
        self.value, self.ok = literal(text)

    def matches(self, printed):
        got, ok = literal(printed)
        return self.ok and ok and got == self.value


def programs(benchmark, problem, code):
    """The sandbox jobs that decide a sample, each with the stdout it must print (None: running to the end of
    its tests is enough). Tests run after the program, so a sys.exit(0) in it fails instead of skipping them.
    HumanEval: the prompt (imports, helpers, the signature), then the code, which may complete the body or
    redefine the whole function; tests: the benchmark's check(entry point). MBPP: the code; tests: the setup
    (which may use the code's classes) and the asserts. LiveCodeBench: the standard-library imports its own
    harness puts first (starter code says `List[int]`), the code; call-based problems run every test against
    Solution().method in one job, stdin problems one job per test. CRUXEval-O: the (trusted) function prints
    repr(f(input)); the prediction is never run: it is read as a Python literal here, outside the sandbox, and
    compared by value with the printed one (Prediction)."""
    if benchmark == "humaneval":
        return [
            (
                sandbox.Job(
                    f"{problem['prompt']}\n{code}", tests=f"{problem['test']}\ncheck({problem['entry_point']})"
                ),
                None,
            )
        ]
    if benchmark == "mbpp":
        return [(sandbox.Job(code, tests=problem["test_setup_code"] + "\n" + "\n".join(problem["test_list"])), None)]
    if benchmark == "cruxeval":
        return [(sandbox.Job(problem["code"], tests=f"print(repr(f({problem['input']})))"), Prediction(code))]
    tests, code = problem.get("tests") or livecodebench_tests(problem), LIVECODEBENCH_IMPORTS + code
    if tests and tests[0]["testtype"] == "functional":
        method = json.loads(problem["metadata"]).get("func_name")
        cases = [([json.loads(line) for line in t["input"].split("\n")], json.loads(t["output"])) for t in tests]
        driver = (
            f"import json as _json\n_target = Solution().{method} if 'Solution' in globals() else {method}\n"
            f"for _args, _expected in _json.loads({json.dumps(cases)!r}):\n"
            "    _got = _target(*_args)\n"
            "    assert _json.loads(_json.dumps(_got)) == _expected, (_args, _got, _expected)\n"
        )
        return [(sandbox.Job(code, tests=driver), None)]
    return [(sandbox.Job(code, stdin=t["input"]), t["output"]) for t in tests]


def livecodebench_tests(problem):
    """A LiveCodeBench problem's public and private tests. Private tests are stored as base64(zlib(pickle(
    JSON text))); the unpickler accepts plain data only, so a tampered file cannot run code here."""
    import base64
    import io
    import pickle
    import zlib

    class PlainData(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test case")

    private = problem["private_test_cases"]
    try:
        private = json.loads(private)
    except json.JSONDecodeError:
        blob = zlib.decompress(base64.b64decode(private))
        private = json.loads(PlainData(io.BytesIO(blob)).load())
    return json.loads(problem["public_test_cases"]) + private


def same_output(printed, expected):
    """LiveCodeBench's stdout check: line by line, token by token, ignoring surrounding whitespace; numbers
    that parse as floats compare by value ('1.0' == '1')."""
    got, want = ([line.split() for line in text.strip().splitlines()] for text in (printed, expected))
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if x != y:
                try:
                    if float(x) != float(y):
                        return False
                except ValueError:
                    return False
    return True


class Graded(NamedTuple):
    answer: str | None  # what was read from the completion: a math answer, a letter, a program, a value
    correct: bool
    failure: str | None = None  # programs and CRUXEval-O: why a sample failed (FAILURES), None when it passed


FAILURES = ("no code block", "syntax error", "timeout", "wrong answer", "runtime error")


def failure_of(answer, results, ok):
    """Why a program's sample failed: nothing to run, it did not compile, it ran out of time, a test's assertion
    (or the printed output) disagreed, or it raised."""
    if answer is None:
        return "no code block"
    if all(ok):
        return None
    if any("SyntaxError" in r.stderr or "IndentationError" in r.stderr for r in results):
        return "syntax error"
    if any(r.status == "timeout" for r in results):
        return "timeout"
    if any("AssertionError" in r.stderr for r in results) or all(r.passed for r in results):
        return "wrong answer"
    return "runtime error"


def expected(stdout, want):
    """Whether a program's output is what its job wants: anything (None), the CRUXEval-O prediction's value, or
    the test's expected text."""
    if want is None:
        return True
    return want.matches(stdout) if isinstance(want, Prediction) else same_output(stdout, want)


def grade_batch(benchmark, problems, texts, timeout=10.0, workers=0):
    """A Graded (answer, correct, failure) for each completion of each problem. Math: tasks.extract_answer and
    math-verify; choice: the letter; code and CRUXEval-O: every job of a sample passes in the sandbox, all jobs
    of the batch run in parallel."""
    spec = BENCHMARKS[benchmark]
    if spec.grade == "math":
        graded = []
        for problem, completions in zip(problems, texts):
            answers = [extract_answer(text, spec.answer_format) for text in completions]
            graded.append([Graded(a, is_correct(a, problem["gold"])) for a in answers])
        return graded
    if spec.grade == "choice":
        return [[Graded(c, c == p["gold"]) for c in map(extract_choice, t)] for p, t in zip(problems, texts)]
    sandbox.self_test(timeout)  # once per process: never a silent zero from a sandbox that cannot run Python
    extract = extract_output if spec.grade == "output" else last_code_block
    answers = [[extract(text) for text in completions] for completions in texts]
    jobs = [
        [programs(benchmark, problem, answer) if answer is not None else [] for answer in sample_answers]
        for problem, sample_answers in zip(problems, answers)
    ]
    flat = [job for per_problem in jobs for per_sample in per_problem for job, _ in per_sample]
    results = iter(sandbox.run_many(flat, workers=workers, timeout=timeout))
    graded = []
    for sample_answers, per_problem in zip(answers, jobs):
        graded.append([])
        for answer, per_sample in zip(sample_answers, per_problem):
            ran = [next(results) for _ in per_sample]
            ok = [r.passed and expected(r.stdout, want) for (_, want), r in zip(per_sample, ran)]
            graded[-1].append(Graded(answer, answer is not None and all(ok), failure_of(answer, ran, ok)))
    return graded
