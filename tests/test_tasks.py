"""The CPU-sized Table 1 task: a deterministic arithmetic generator with disjoint splits, and training rewards
that grade unboxed numeric answers when the gold answers are GSM8K-style."""

import json
import os

import pytest
import torch
from conftest import ROOT
from test_runs import script

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


# ----------------------------------------------------------------------------- the plain (base-like) prompt format
def test_plain_prompt_format_renders_text_without_the_template(tokenizer):
    text = I.render_prompt(tokenizer, "What is 2 + 3?", "Think step by step.", "plain")
    assert text == "Think step by step.\n\nQuestion: What is 2 + 3?\nAnswer:"
    assert I.render_prompt(tokenizer, "What is 2 + 3?", "", "plain") == "Question: What is 2 + 3?\nAnswer:"
    assert "<|im_start|>" in I.render_prompt(tokenizer, "What is 2 + 3?", "Think.", "chat")  # the default


def test_plain_completions_stop_after_the_stop_string(tokenizer):
    ids = tokenizer(" 2 + 3 = 5.\n\nQuestion: What is 7 * 6?", add_special_tokens=False).input_ids
    n = len(ids)
    r = I.Rollout(prompt=[1], completion=list(ids), self_certainty=0.0, entropy=0.0, truncated=True,
                  token_certainty=torch.arange(n, dtype=torch.float32), token_entropy=torch.ones(n),
                  token_logp=-torch.ones(n))  # fmt: skip
    I.cut_at_stop([r], tokenizer, I.PLAIN_STOP)
    text = tokenizer.decode(r.completion)
    assert text.endswith("Question:") and "7 * 6" not in text and not r.truncated
    k = len(r.completion)
    assert r.token_certainty.tolist() == list(range(k)) and r.self_certainty == pytest.approx((k - 1) / 2)
    ones = torch.ones(5)
    unchanged = I.Rollout(prompt=[1], completion=list(ids[:5]), self_certainty=1.0, entropy=1.0, truncated=False,
                          token_certainty=ones, token_entropy=ones, token_logp=ones)  # fmt: skip
    I.cut_at_stop([unchanged], tokenizer, I.PLAIN_STOP)
    assert len(unchanged.completion) == 5  # no stop string: EOS or the budget ends it, as before


def test_plain_format_trains_and_evaluates(tiny_dir, tmp_path):
    from test_intuitor import small_run

    small_run(tiny_dir, tmp_path / "run", "--max_steps", "1", "--save_steps", "0", "--prompt_format", "plain")
    out = tmp_path / "e.jsonl"
    p = script("eval.py", "--model", tiny_dir, "--benchmark", "arithmetic", "--limit", "2", "--max_new_tokens", "4",
               "--prompt_format", "plain", "--output", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(open(str(out).replace(".jsonl", ".summary.json")).read())["prompt_format"] == "plain"
