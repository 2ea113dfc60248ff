"""The CPU-sized Table 1 task: a deterministic arithmetic generator with disjoint splits, and training rewards
that grade unboxed numeric answers when the gold answers are GSM8K-style."""

import json
import os

from conftest import ROOT

import intuitor as I
from intuitor_harness import tasks


def expression(row):
    return row["answer"].split(" = ")[0]  # "a op b"


def test_arithmetic_splits_are_deterministic_disjoint_and_match_the_committed_files():
    train, test = tasks.arithmetic_splits()
    assert (train, test) == tasks.arithmetic_splits()  # same seed, same problems
    assert tasks.arithmetic_splits(seed=1) != (train, test)
    assert len(train) == 431 and len(test) == 300
    assert not {expression(r) for r in train} & {expression(r) for r in test}  # never trained on, in any phrasing
    for row in train + test:
        a, op, b = expression(row).split()
        assert row["answer"].endswith(f"#### {eval(f'{a} {op} {b}')}")  # noqa: S307 - our own digits
    for name, rows in (
        ("train", train),
        ("test", test),
    ):  # what `python -m intuitor_harness.tasks arithmetic data` writes
        with open(os.path.join(ROOT, "data", f"arithmetic_{name}.jsonl")) as f:
            assert [json.loads(line) for line in f] == rows


def test_answer_format_is_inferred_from_the_gold_answers():
    from datasets import Dataset

    gsm = Dataset.from_list([{"question": "q", "answer": "2 + 2 = 4\n#### 4"}])
    math = Dataset.from_list([{"problem": "q", "solution": "so \\boxed{4}"}])
    assert tasks.infer_answer_format(gsm) == "number" and tasks.infer_answer_format(math) == "boxed"
    assert tasks.infer_answer_format(math, answer_format="number") == "number"  # an explicit choice stands


def test_number_format_grades_unboxed_answers(tokenizer):
    def rollout(text):
        return I.Rollout(prompt=[1], completion=tokenizer(text).input_ids, self_certainty=0.0, entropy=0.0,
                         truncated=False)  # fmt: skip

    texts = ["28 + 28 = 56", "The answer is 56.", "I think 54", "\\boxed{56} and then 3"]
    rollouts = [rollout(t) for t in texts]
    I.grade(rollouts, ["56"], tokenizer, 4, "number")
    assert [r.correct for r in rollouts] == [True, True, False, True]
    I.grade(rollouts, ["56"], tokenizer, 4, "boxed")
    assert [r.correct for r in rollouts] == [False, False, False, True]
    assert I.compute_rewards(rollouts, {"plurality": 1.0}, 4, I.Args())["plurality"].tolist() == [0, 0, 0, 1]


def test_the_arithmetic_benchmark_finds_its_shipped_file_from_anywhere(tmp_path, monkeypatch):
    from intuitor_harness import benchmarks

    monkeypatch.chdir(tmp_path)  # data/ is found beside intuitor_harness/, not in the working directory
    assert len(benchmarks.load_problems("arithmetic")) == 300
