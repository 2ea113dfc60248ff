"""
GSM8K / MATH-500 accuracy of a checkpoint, self-certainty vs correctness (paper Fig. 8), and best-of-N
selection by self-certainty (arXiv 2502.18581).

    python eval.py --model runs/intuitor/checkpoint-50 --benchmark math500
    python eval.py --model PATH --benchmark gsm8k --data gsm8k_test.jsonl --limit 100 --max_new_tokens 256
    python eval.py --model PATH --benchmark math500 --n 8 --temperature 0.7        # best-of-8
    torchrun --nproc_per_node=8 eval.py --model PATH --benchmark math500           # sharded, gathered on rank 0

Prompting (chat template + system prompt) and decoding come from intuitor.py, so an answer's self-certainty
is the exact quantity the policy was trained on, free from the sampling loop; answers are graded by tasks.py,
as the training rewards are. Greedy by default, as in the paper.
"""

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import intuitor
import sandbox
from common import answer_clusters, die, extract_answer, is_correct, last_boxed, mann_whitney


# ----------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's problems come from, what the model is asked, and how its answer is graded."""

    hub: str  # dataset id on the hub ("" = local file only)
    config: str | None
    columns: tuple  # the columns a problem needs (checked in --data files)
    ask: Callable[[dict], str]  # the user turn, from a row
    grade: Literal["math", "choice", "output", "code"]  # see grade_batch
    answer_format: str = ""  # math: "boxed" or "number" (common.extract_answer)
    groups: tuple = ()  # columns accuracy is also broken down by


def code_task(text):
    return f"{text.strip()}\n\nWrite the solution in Python in a single ```python code block."


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


LETTERS = "ABCDEFGHIJ"
LIVECODEBENCH_FILES = [f"test{k}.jsonl" for k in ("", 2, 3, 4, 5, 6)]  # release_v6: problems of releases 1 to 6
BENCHMARKS = {
    # local only: data/arithmetic_test.jsonl (python common.py arithmetic data)
    "arithmetic": Benchmark("", None, ("question",), lambda r: r["question"], "math", "number"),
    "gsm8k": Benchmark("openai/gsm8k", "main", ("question",), lambda r: r["question"], "math", "number"),
    "math500": Benchmark(
        "HuggingFaceH4/MATH-500",
        None,
        ("problem", "answer"),
        lambda r: r["problem"],
        "math",
        "boxed",
        groups=("subject", "level"),
    ),  # fmt: skip
    "humaneval": Benchmark(
        "openai/openai_humaneval",
        None,
        ("prompt", "test", "entry_point"),
        lambda r: code_task(f"Complete this function:\n```python\n{r['prompt'].rstrip()}\n```"),
        "code",
    ),  # fmt: skip
    "mbpp": Benchmark(
        "google-research-datasets/mbpp",
        "full",
        ("text", "test_list", "test_setup_code"),
        lambda r: code_task(f"{r['text']}\nYour code should pass these tests:\n" + "\n".join(r["test_list"])),
        "code",
    ),  # fmt: skip
    "livecodebench": Benchmark(
        "livecodebench/code_generation_lite",
        None,
        ("question_content", "starter_code", "public_test_cases", "private_test_cases", "metadata"),
        ask_livecodebench,
        "code",
        groups=("difficulty", "platform"),
    ),  # fmt: skip
    "cruxeval": Benchmark("cruxeval-org/cruxeval", None, ("code", "input", "output"), ask_cruxeval, "output"),
    "mmlu_pro": Benchmark(
        "TIGER-Lab/MMLU-Pro", None, ("question", "options", "answer"), ask_mmlu_pro, "choice", groups=("category",)
    ),  # fmt: skip
}
NEUTRAL_SYSTEM_PROMPT = "You are a helpful AI Assistant. Think step by step, then answer in the form the user asks for."


@dataclass
class EvalArgs:
    model: str = field(default="", metadata={"help": "hub id, local directory or .gguf file (required)"})
    benchmark: Literal[tuple(BENCHMARKS)] = field(default="math500", metadata={"help": "see README, Benchmarks"})
    data: str = field(default="", metadata={"help": "local .jsonl/.parquet with the hub dataset's columns"})
    limit: int = field(default=0, metadata={"help": "first N problems only; 0 = all"})
    batch_size: int = field(default=16, metadata={"help": "problems sampled at once per rank"})
    max_new_tokens: int = field(default=3072, metadata={"help": "completion budget"})
    n: int = field(default=1, metadata={"help": "samples per problem; > 1 enables best-of-N selection"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    borda_p: float = field(default=0.5, metadata={"help": "exponent of self-certainty-weighted Borda voting"})
    system_prompt: str = field(
        default="", metadata={"help": "empty = the training prompt for math benchmarks, a neutral one for the others"}
    )
    output: str = field(
        default="",
        metadata={
            "help": "per-problem records (default runs/eval/BENCHMARK.jsonl); "
            "the summary goes beside it, *.summary.json"
        },
    )
    seed: int = field(default=0, metadata={"help": "sampling seed (n > 1)"})
    timeout: float = field(default=10.0, metadata={"help": "seconds per program run (code benchmarks, CRUXEval)"})
    grading_workers: int = field(default=0, metadata={"help": "programs run at once; 0 = one per CPU core"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto = cuda when available"})


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def mcnemar_exact(before, after):
    """Paired test of correctness on the same problems (McNemar, exact): b problems right only before, c right
    only after; two-sided p = P(Bin(b + c, 1/2) at least as far from (b + c) / 2 as observed)."""
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return {"only_before": b, "only_after": c, "p_value": min(1.0, 2 * tail)}


def compare(paths):
    """python eval.py compare BASE.jsonl RUN.jsonl ...: one markdown row per evaluation (eval.py's per-problem
    records and their summaries), each paired against the first on the same problems."""
    if len(paths) < 1 or not all(os.path.isfile(p) for p in paths):
        die("usage: python eval.py compare BASE.jsonl [RUN.jsonl ...] (per-problem records written by eval.py)")
    base = [json.loads(line) for line in open(paths[0])]
    print(
        "| model | accuracy [95% CI] | mean length | truncated | mean SC | SC-correct AUROC (p) | vs base: b / c, p |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, path in enumerate(paths):
        records = [json.loads(line) for line in open(path)]
        if [r["index"] for r in records] != [r["index"] for r in base]:
            die(f"{path} and {paths[0]} hold different problems; compare evaluations of the same problems")
        s = json.load(open(os.path.splitext(path)[0] + ".summary.json"))
        sc = s["self_certainty_vs_correctness"]
        test = mcnemar_exact([r["correct"] for r in base], [r["correct"] for r in records])
        lo, hi = s["accuracy_ci95"]
        auroc = f"{sc['auroc']:.2f} ({sc['p_value']:.2g})" if "auroc" in sc else "-"
        paired = "-" if i == 0 else f"{test['only_before']} / {test['only_after']}, {test['p_value']:.2g}"
        print(
            f"| {path} | {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {s['mean_length']:.1f} | "
            f"{s['truncated_frac']:.2f} | {s['mean_self_certainty']:.2f} | {auroc} | {paired} |"
        )


# ----------------------------------------------------------------------------- best-of-N selection
def select(labels, certainties, p=0.5):
    """Indices chosen among N samples by: highest self-certainty; majority vote over answers (equal labels
    are the same answer); self-certainty-weighted Borda voting (sample of SC rank r scores (N - r + 1)^p for
    its answer). Ties go to the answer whose best sample has the higher self-certainty; no answer (label None)
    never wins a vote. labels None (programs, which cannot be compared): self-certainty only."""
    n = len(certainties)
    order = sorted(range(n), key=lambda i: -certainties[i])
    if labels is None:
        return {"self_certainty": order[0]}
    votes, borda = Counter(), Counter()
    for rank, i in enumerate(order, start=1):
        if labels[i] is not None:
            votes[labels[i]] += 1
            borda[labels[i]] += (n - rank + 1) ** p
    first = {labels[i]: i for i in reversed(order)}  # each answer's most certain sample

    def winner(scores):
        if not scores:
            return order[0]
        return first[max(scores, key=lambda c: (scores[c], certainties[first[c]]))]

    return {"self_certainty": order[0], "majority": winner(votes), "borda": winner(borda)}


# ----------------------------------------------------------------------------- problems and records
def load_problems(args):
    """Problems of the benchmark (hub, or --data with the hub dataset's columns): each row, with `question`
    (the user turn) and `gold` (the answer to match, for math, choice and CRUXEval-O; None for programs)."""
    spec = BENCHMARKS[args.benchmark]
    data = args.data or ("" if spec.hub else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                            "arithmetic_test.jsonl"))  # fmt: skip
    if data:
        rows = common.load_rows(data, "test", flag="--data")
    else:
        from datasets import load_dataset

        common.check_hub(spec.hub, "--benchmark")
        try:
            if args.benchmark == "livecodebench":  # its JSON files (datasets >= 4 runs no loading scripts)
                files = [f"hf://datasets/{spec.hub}/{name}" for name in LIVECODEBENCH_FILES]
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
            f"--benchmark {args.benchmark} needs the hub dataset's columns: {', '.join(spec.columns)}"
        )
    bad = [
        i for i, row in enumerate(rows) if not isinstance(row[spec.columns[0]], str) or not row[spec.columns[0]].strip()
    ]
    if bad:
        die(f"{source}: {len(bad)} rows have no text in {spec.columns[0]!r} (first: row {bad[0]}); fix the file")
    golds = [None] * len(rows)  # programs are graded by their tests
    if spec.grade == "math":
        golds = common.gold_answers(rows)
        if all(gold is None for gold in golds):
            die(f"--data has no gold answers (an `answer` or `solution` column) for --benchmark {args.benchmark}")
    elif spec.grade in ("choice", "output"):
        golds = rows["answer" if spec.grade == "choice" else "output"]
    problems = [dict(row, question=spec.ask(row), gold=gold) for row, gold in zip(rows, golds)]
    return problems[: args.limit] if args.limit else problems


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
def programs(benchmark, problem, code):
    """The sandbox jobs that decide a sample, each with the stdout it must print (None: exit status 0 is
    enough). HumanEval: the prompt (imports, helpers, the signature), the code, the tests, check(entry point);
    the code may complete the body or redefine the whole function. MBPP: the code, the setup (which may use the
    code's classes), its asserts.
    LiveCodeBench: call-based problems run all tests in one program against Solution().method; stdin problems
    run once per test. CRUXEval-O: `assert f(input) == prediction` after the function."""
    if benchmark == "humaneval":
        return [(f"{problem['prompt']}\n{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n", "", None)]
    if benchmark == "mbpp":
        return [(f"{code}\n\n{problem['test_setup_code']}\n" + "\n".join(problem["test_list"]) + "\n", "", None)]
    if benchmark == "cruxeval":
        return [(f"{problem['code']}\n\nassert f({problem['input']}) == ({code})\n", "", None)]
    tests = livecodebench_tests(problem)
    if tests and tests[0]["testtype"] == "functional":
        method = json.loads(problem["metadata"]).get("func_name")
        cases = [([json.loads(line) for line in t["input"].split("\n")], json.loads(t["output"])) for t in tests]
        driver = (
            f"\n\nimport json as _json\n_target = Solution().{method} if 'Solution' in globals() else {method}\n"
            f"for _args, _expected in _json.loads({json.dumps(cases)!r}):\n"
            "    _got = _target(*_args)\n"
            "    assert _json.loads(_json.dumps(_got)) == _expected, (_args, _got, _expected)\n"
        )
        return [(code + driver, "", None)]
    return [(code, t["input"], t["output"]) for t in tests]


def livecodebench_tests(problem):
    """A LiveCodeBench problem's public and private tests. Private tests are stored as base64(zlib(pickle(
    JSON text))); the unpickler accepts plain data only, so a tampered file cannot run code here."""
    import base64
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
        private = json.loads(PlainData(__import__("io").BytesIO(blob)).load())
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


def grade_batch(benchmark, problems, texts, args):
    """(extracted answer, correct) for each completion of each problem. Math: common.extract_answer and
    math-verify; choice: the letter; code and CRUXEval-O: every job of a sample passes in the sandbox, all jobs
    of the batch run in parallel."""
    spec = BENCHMARKS[benchmark]
    if spec.grade == "math":
        graded = []
        for problem, completions in zip(problems, texts):
            answers = [extract_answer(text, spec.answer_format) for text in completions]
            graded.append([(a, is_correct(a, problem["gold"])) for a in answers])
        return graded
    if spec.grade == "choice":
        return [[(c, c == p["gold"]) for c in map(extract_choice, t)] for p, t in zip(problems, texts)]
    extract = extract_output if spec.grade == "output" else last_code_block
    answers = [[extract(text) for text in completions] for completions in texts]
    jobs = [
        [programs(benchmark, problem, answer) if answer is not None else [] for answer in sample_answers]
        for problem, sample_answers in zip(problems, answers)
    ]
    flat = [job for per_problem in jobs for per_sample in per_problem for job in per_sample]
    results = iter(
        sandbox.run_many(
            [sandbox.Job(source, stdin) for source, stdin, _ in flat],
            workers=args.grading_workers or None,
            timeout=args.timeout,
        )
    )
    graded = []
    for sample_answers, per_problem in zip(answers, jobs):
        graded.append([])
        for answer, per_sample in zip(sample_answers, per_problem):
            ok = [
                r.passed and (want is None or same_output(r.stdout, want))
                for (_, _, want), r in zip(per_sample, results)
            ]
            graded[-1].append((answer, answer is not None and all(ok)))
    return graded


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), the chance that k of the n samples,
    drawn without replacement, hold at least one of the c correct ones."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_records(outputs, texts, graded):
    """One record per sampled completion: text, extracted answer, correctness, self-certainty, length."""
    return [
        {
            "completion": text,
            "extracted": answer,
            "correct": correct,
            "self_certainty": rollout.self_certainty,
            "length": len(rollout.completion),
            "truncated": rollout.truncated,
        }
        for rollout, text, (answer, correct) in zip(outputs, texts, graded)
    ]


# ----------------------------------------------------------------------------- records and summary
def problem_record(index, problem, samples, args):
    """A problem's record: its greedy sample's fields, or with several samples each rule's choice."""
    spec = BENCHMARKS[args.benchmark]
    keys = ("task_id", "question_id", "id", *spec.groups)
    record = {"index": index, "problem": problem["question"], "gold": problem["gold"]}
    record.update({key: problem[key] for key in keys if key in problem})
    if len(samples) == 1:
        record.update(samples[0])
        return record
    answers = [s["extracted"] for s in samples]
    labels = {"math": answer_clusters, "code": lambda _: None}.get(spec.grade, lambda a: a)(answers)
    chosen = select(labels, [s["self_certainty"] for s in samples], args.borda_p)
    record.update(
        samples=samples,
        correct=samples[chosen["self_certainty"]]["correct"],
        selected={rule: {"index": c, "correct": samples[c]["correct"]} for rule, c in chosen.items()},
    )
    return record


def summarize(records, args, system_prompt):
    n = len(records)
    samples = [s for r in records for s in (r["samples"] if args.n > 1 else [r])]

    def mean(values):  # over all samples: with n > 1, the accuracy of a single sample
        return sum(values) / max(len(samples), 1)

    k = sum(s["correct"] for s in samples)
    out = {
        "benchmark": args.benchmark,
        "model": args.model,
        "n_problems": n,
        "samples_per_problem": args.n,
        "accuracy": mean([s["correct"] for s in samples]),
        "accuracy_ci95": wilson_interval(k, len(samples)),
        "mean_length": mean([s["length"] for s in samples]),
        "truncated_frac": mean([s["truncated"] for s in samples]),
        "answer_found_frac": mean([s["extracted"] is not None for s in samples]),  # a box, a code block, a letter
        "boxed_frac": mean([last_boxed(s["completion"]) is not None for s in samples]),
        "mean_self_certainty": mean([s["self_certainty"] for s in samples]),
        "system_prompt": system_prompt,
    }
    right = [s["self_certainty"] for s in samples if s["correct"]]
    wrong = [s["self_certainty"] for s in samples if not s["correct"]]
    out["self_certainty_vs_correctness"] = {
        "mean_correct": sum(right) / len(right) if right else None,
        "mean_incorrect": sum(wrong) / len(wrong) if wrong else None,
        **(mann_whitney(right, wrong) or {}),
    }
    if args.n > 1:
        for rule in records[0]["selected"]:
            out[f"best_of_n/{rule}"] = sum(r["selected"][rule]["correct"] for r in records) / n
        out["best_of_n/pass@n"] = sum(any(s["correct"] for s in r["samples"]) for r in records) / n
        for k in sorted({2**e for e in range(args.n.bit_length()) if 2**e <= args.n} | {args.n}):
            out[f"pass@{k}"] = sum(pass_at_k(args.n, sum(s["correct"] for s in r["samples"]), k) for r in records) / n
    for key in BENCHMARKS[args.benchmark].groups:
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["correct"])
        out[f"accuracy_by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    args = common.parse_flags(EvalArgs, argv)
    if not args.model:
        die("--model is required: a hub id, a local model directory or a .gguf file")
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or args.limit < 0:
        die("--n, --batch_size and --max_new_tokens must be >= 1, --limit >= 0 (0 = all)")
    if not 0 <= args.temperature < math.inf or (args.n > 1 and args.temperature == 0):
        die("--temperature must be >= 0, and > 0 with --n > 1 (else all samples are the same greedy answer)")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA device here; pass --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    rt = common.runtime_from_env(args.device)
    common.init_distributed(rt)
    problems = load_problems(args)
    lm, tokenizer = common.load_model(args.model, rt.device)
    lm.eval()
    stop_ids, pad_id = common.stop_token_ids(tokenizer, lm), tokenizer.pad_token_id
    system_prompt = args.system_prompt or (
        intuitor.SYSTEM_PROMPT if BENCHMARKS[args.benchmark].grade == "math" else NEUTRAL_SYSTEM_PROMPT
    )
    mine = list(range(rt.rank, len(problems), rt.world_size))
    records = []
    torch.manual_seed(args.seed + rt.rank)
    progress = tqdm(total=len(mine), unit="problem", disable=not common.progress_bars(rt.rank), desc=args.benchmark)
    for i in range(0, len(mine), args.batch_size):
        indices = mine[i : i + args.batch_size]
        rendered = [common.render_prompt(tokenizer, problems[j]["question"], system_prompt) for j in indices]
        prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in rendered]
        with rt.autocast():
            outputs = intuitor.sample(lm, prompts, args.n, args.max_new_tokens, args.temperature, stop_ids, pad_id)
        texts = [tokenizer.decode(rollout.completion, skip_special_tokens=True) for rollout in outputs]
        per_problem = [texts[k * args.n : (k + 1) * args.n] for k in range(len(indices))]
        graded = grade_batch(args.benchmark, [problems[j] for j in indices], per_problem, args)
        for k, j in enumerate(indices):
            samples = sample_records(outputs[k * args.n : (k + 1) * args.n], per_problem[k], graded[k])
            records.append(problem_record(j, problems[j], samples, args))
        progress.update(len(indices))
    if rt.world_size > 1:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
        dist.destroy_process_group()
    if rt.rank != 0:
        return
    records.sort(key=lambda r: r["index"])
    summary = summarize(records, args, system_prompt)
    output = args.output or os.path.join("runs", "eval", f"{args.benchmark}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.splitext(output)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"wrote {output} (one record per problem) and {os.path.splitext(output)[0]}.summary.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2:])
    else:
        main(sys.argv[1:])
